"""node/punch.py: the synchronised dial from the listen port, and the Puncher's exchange over a
channel, on loopback; a real TCP simultaneous open inside a throw-away namespace whose firewall
drops unsolicited SYNs as a NAT does."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import netns
import pytest

from valuemesh.node.punch import PunchDialError, Puncher, PunchFailed, dial_together, enable_reuse
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import Transport
from valuemesh.protocol import cbor, punch
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.punch import Candidate

LO = "127.0.0.1"
BED = Path(__file__).with_name("punch_bed.py")
PEER_DEADLINE = 60.0


def listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    enable_reuse(s)
    s.bind((LO, port))
    s.listen(8)
    return s


def closed_port() -> int:
    s = socket.socket()
    s.bind((LO, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_first_connection_wins_and_leaves_from_the_listen_port() -> None:
    node = listener()  # the node's own server, sharing its port with the punch sockets
    far = listener()
    port = node.getsockname()[1]
    try:
        sock, won = await dial_together(
            (LO, port), (Candidate(LO, closed_port()), Candidate(LO, far.getsockname()[1])), window=1.0
        )
        assert won == Candidate(LO, far.getsockname()[1])
        assert sock.getsockname() == (LO, port)
        conn, addr = far.accept()
        assert addr == (LO, port)
        conn.close()
        sock.close()
    finally:
        node.close()
        far.close()


async def test_no_candidate_answers_fails_with_every_reason() -> None:
    dead = (Candidate(LO, closed_port()), Candidate(LO, closed_port()))
    with pytest.raises(PunchDialError) as err:
        await dial_together((LO, closed_port()), dead, window=0.3)
    for c in dead:
        assert f"{c.host}:{c.port}: refused" in str(err.value)
    with pytest.raises(PunchDialError, match="no address"):
        await dial_together((LO, closed_port()), ())


async def test_responder_keeps_the_connection_the_initiator_spoke_on() -> None:
    quiet, speaker = listener(), listener()
    quiet.setblocking(False)
    speaker.setblocking(False)
    loop = asyncio.get_running_loop()
    local = (LO, closed_port())

    async def speak() -> socket.socket:
        conn, _ = await loop.sock_accept(speaker)
        await loop.sock_sendall(conn, b"H")
        return conn

    talker = asyncio.ensure_future(speak())
    try:
        sock, won = await dial_together(
            local,
            (Candidate(LO, quiet.getsockname()[1]), Candidate(LO, speaker.getsockname()[1])),
            window=1.0,
            wait_for_bytes=True,
        )
        assert won.port == speaker.getsockname()[1]
        assert sock.recv(1) == b"H"  # the first bytes were left for the stream
        idle, _ = await loop.sock_accept(quiet)
        assert await asyncio.wait_for(loop.sock_recv(idle, 1), 2) == b""  # the loser was closed
        idle.close()
        sock.close()
        (await talker).close()
    finally:
        quiet.close()
        speaker.close()


class Pipe:
    """One end of an in-memory PunchChannel pair."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.sent: list[bytes] = []

    async def send(self, payload: bytes) -> None:
        self.sent.append(payload)
        await self.outbox.put(payload)

    async def recv(self, timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.inbox.get()


def pipes() -> tuple[Pipe, Pipe]:
    a: asyncio.Queue[bytes] = asyncio.Queue()
    b: asyncio.Queue[bytes] = asyncio.Queue()
    return Pipe(a, b), Pipe(b, a)


A, B = MemberId(b"\x01" * 32), MemberId(b"\x02" * 32)


def puncher(me: MemberId, port: int, **kw: float) -> Puncher:
    return Puncher(me, (LO, port), lambda: (Candidate(LO, port),), dial_window=0.2, **kw)  # type: ignore[arg-type]


async def test_silent_peer_costs_bounded_tries_then_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(punch, "REPLY_TIMEOUT", 0.05)
    mine, _theirs = pipes()
    p = puncher(A, closed_port())
    got = await p.upgrade(mine, B)
    assert isinstance(got, PunchFailed)
    assert "did not answer" in got.reason and "gave up after 3 tries" in got.reason and got.reason.endswith(" s.")
    assert len(mine.sent) == 3  # one CONNECT per try, no more
    again = await p.upgrade(mine, B)
    assert isinstance(again, PunchFailed) and "backed off" in again.reason
    assert len(mine.sent) == 3


async def test_garbage_answer_fails_the_try_with_one_sentence() -> None:
    mine, theirs = pipes()
    p = Puncher(A, (LO, closed_port()), lambda: (Candidate(LO, 9),), tries=1)
    await theirs.send(b"\xffnot cbor")
    got = await p.upgrade(mine, B)
    assert isinstance(got, PunchFailed) and "not valid CBOR" in got.reason


async def test_responder_refuses_sync_first_and_too_many_requests() -> None:
    mine, theirs = pipes()
    p = puncher(B, closed_port())
    got = await p.answer(mine, A, punch.encode(punch.Sync(bytes(16))))
    assert isinstance(got, PunchFailed) and "not answering" in got.reason
    connect = punch.encode(punch.Connect(bytes(16), (Candidate(LO, closed_port()),)))
    for _ in range(punch.MAX_TRIES):
        await theirs.send(b"\xa0")  # a bad SYNC ends each answer at once
        assert isinstance(await p.answer(mine, A, connect), PunchFailed)
    refused = await p.answer(mine, A, connect)
    assert isinstance(refused, PunchFailed) and "too often" in refused.reason
    assert len(mine.sent) == punch.MAX_TRIES  # the refused request got no answer
    assert all(isinstance(punch.decode(m), punch.Connect) for m in mine.sent)


async def test_crossed_requests_end_in_one_attempt() -> None:
    # Both ends start at once: the higher id answers the lower id's attempt, so both reach
    # the dial of one attempt (which fails here: nothing filters the loopback RSTs).
    a_side, b_side = pipes()
    pa, pb = puncher(A, closed_port(), tries=1), puncher(B, closed_port(), tries=1)
    ra, rb = await asyncio.gather(pa.upgrade(a_side, B), pb.upgrade(b_side, A))
    assert isinstance(ra, PunchFailed) and isinstance(rb, PunchFailed)
    assert "No direct connection" in ra.reason and "No direct connection" in rb.reason
    a_msgs = [punch.decode(m) for m in a_side.sent]
    b_msgs = [punch.decode(m) for m in b_side.sent]
    assert [type(m) for m in a_msgs] == [punch.Connect, punch.Sync]
    assert [type(m) for m in b_msgs] == [punch.Connect, punch.Connect]
    assert b_msgs[1].id == a_msgs[0].id == a_msgs[1].id


async def test_hostile_connect_with_too_many_addresses_is_refused() -> None:
    mine, _ = pipes()
    p = puncher(B, closed_port())
    raw = cbor.encode({"t": "punch-connect", "id": bytes(16), "addrs": [[LO, n] for n in range(1, 40)]})
    got = await p.answer(mine, A, raw)
    assert isinstance(got, PunchFailed) and "1 to 8" in got.reason
    assert mine.sent == []


FIREWALL = """table inet vmpunch {{
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport {coord} accept
    ct state new drop
  }}
}}
"""


def run_pair(
    lan: netns.NetnsLan, hosts: list[netns.Host], coord: netns.Host, extra: list[str]
) -> list[dict[str, object]]:
    """Start the coordinator on `coord`, then the answering and the upgrading peer; return
    both peers' reports (answer side first)."""
    port = 7800
    py = [sys.executable, str(BED)]
    c = lan.popen(coord, [*py, "coordinator", coord.ip, str(port)], stdout=subprocess.PIPE)
    assert c.stdout is not None
    assert "listening" in c.stdout.readline()
    procs = [
        lan.popen(h, [*py, "peer", coord.ip, str(port), str(i + 1), h.ip, str(7700 + i), role, *extra],
                  stdout=subprocess.PIPE)
        for i, (h, role) in enumerate(zip(hosts, ("answer", "upgrade"), strict=True))
    ]
    try:
        outs = [p.communicate(timeout=PEER_DEADLINE)[0] for p in procs]
    finally:
        for p in [*procs, c]:
            lan.stop(p)
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


# The bed's peers: identities from seeds of their member byte (1 answers, 2 upgrades).
ONE, TWO = Identity(b"\x01" * 32).member, Identity(b"\x02" * 32).member


def firewalled_pair(extra: list[str]) -> tuple[netns.Host, list[dict[str, object]]]:
    """Two peers on one namespace's address, each on its own listen port, behind a firewall
    that drops every SYN arriving before the receiving side's own SYN left, as a NAT does."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.remove_stale()
    with netns.NetnsLan(1) as lan:
        host = lan.hosts[0]
        rules = FIREWALL.format(coord=7800)
        subprocess.run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=rules, text=True,
                       check=True, timeout=10)
        return host, run_pair(lan, [host, host], host, extra)


@pytest.mark.netns
@pytest.mark.slow
def test_simultaneous_open_through_a_stateful_firewall() -> None:
    host, (answer, upgrade) = firewalled_pair([])
    assert answer["ok"] is True, answer
    assert upgrade["ok"] is True, upgrade
    # One stream, seen from both ends: each left from its listen port to the other's.
    assert upgrade["local"] == [host.ip, 7701] and upgrade["remote"] == [host.ip, 7700]
    assert answer["local"] == [host.ip, 7700] and answer["remote"] == [host.ip, 7701]
    # The lower id runs the handshake as initiator, whichever side started the punch.
    assert answer["initiator"] is punch.handshake_initiator(ONE, TWO)
    assert upgrade["initiator"] is punch.handshake_initiator(TWO, ONE)
    assert answer["heard"] == 2 and upgrade["heard"] == 1
    # No punched SYN reached a listening socket instead of the dialling one.
    assert answer["stolen"] == [] and upgrade["stolen"] == []


@pytest.mark.netns
@pytest.mark.slow
def test_punched_stream_becomes_a_punched_peer_link() -> None:
    host, (answer, upgrade) = firewalled_pair(["--link"])
    assert answer["ok"] is True, answer
    assert upgrade["ok"] is True, upgrade
    # The wire handshake ran over the punched stream, each end in the role the ids give,
    # each end authenticated the other's key, and a frame crossed the link each way.
    assert answer["path"] == upgrade["path"] == "punched"
    assert answer["member"] == str(TWO) and upgrade["member"] == str(ONE)
    assert answer["initiator"] is punch.handshake_initiator(ONE, TWO)
    assert upgrade["initiator"] is punch.handshake_initiator(TWO, ONE)
    assert answer["heard"] == 2 and upgrade["heard"] == 1
    assert upgrade["local"] == [host.ip, 7701] and upgrade["remote"] == [host.ip, 7700]


async def test_transport_shares_its_port_with_punch_sockets_but_not_with_a_second_node() -> None:
    first = Transport(Identity(b"\x07" * 32), b"net", QuietHandler())
    second = Transport(Identity(b"\x08" * 32), b"net", QuietHandler())
    _, port = await first.start(LO, 0)
    far = listener()
    try:
        # A punch socket dials from the listening port...
        sock, _ = await dial_together((LO, port), (Candidate(LO, far.getsockname()[1]),), window=1.0)
        assert sock.getsockname() == (LO, port)
        sock.close()
        # ...but another daemon cannot listen there too (SO_REUSEPORT would have let it).
        with pytest.raises(LocalError, match="Cannot listen"):
            await second.start(LO, port)
    finally:
        far.close()
        await first.stop()
        await second.stop()


class Gone(Pipe):
    async def recv(self, timeout: float) -> bytes:
        raise ConnectionError("link closed")


async def test_a_link_that_closes_mid_exchange_fails_with_one_sentence_and_no_back_off() -> None:
    """The relay went away mid-exchange: nothing was learnt of the pair, so the next relayed
    link may try at once (a relay's restart used to cost the pair minutes of back-off)."""
    q: asyncio.Queue[bytes] = asyncio.Queue()
    p = puncher(A, closed_port())
    got = await p.upgrade(Gone(q, q), B)
    assert isinstance(got, PunchFailed) and "closed during the hole-punch exchange" in got.reason
    assert got.link_lost and p.backoff.wait(B, p.clock()) == 0
    connect = punch.encode(punch.Connect(bytes(16), (Candidate(LO, 9),)))
    answered = await puncher(B, closed_port()).answer(Gone(q, q), A, connect)
    assert isinstance(answered, PunchFailed) and "closed during" in answered.reason
