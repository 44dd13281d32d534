"""Tests of the peer handshake (pure, protocol/wire.py) and of the transport over real
websockets on 127.0.0.1, including hostile peers written against the wire format directly.

Every network test runs under a deadline and stops every transport it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from transport_kit import (
    FAST,
    NET,
    Cluster,
    Node,
    Recorder,
    exchange,
    ident,
    recv,
    running_cluster,
    until,
)

from valuemesh.node.link_limits import BackedOffError, LinkClosedError, PeerUnreachableError
from valuemesh.node.transport import PEER_PATH, Transport
from valuemesh.protocol import wire
from valuemesh.protocol.errors import (
    AuthorizationError,
    LocalError,
    RemoteError,
    SignatureError,
)
from valuemesh.protocol.identity import Identity

# -- pure handshake ----------------------------------------------------------


def handshake(
    a: Identity, b: Identity, net_a: bytes = NET, net_b: bytes = NET
) -> tuple[wire.SecureChannel, wire.SecureChannel, list[bytes]]:
    i = wire.Initiator(a, net_a, os.urandom(32))
    r = wire.Responder(b, net_b, os.urandom(32))
    m1 = i.start()
    m2 = r.read_hello(m1)
    assert i.read_response(m2) == b.member
    m3 = i.auth()
    assert r.read_auth(m3) == a.member
    m4, ch_r = r.verdict()
    ch_i = i.read_verdict(m4)
    assert ch_r is not None
    return ch_i, ch_r, [m1, m2, m3, m4]


def test_handshake_agrees_and_frames_flow_both_ways() -> None:
    a, b = ident(), ident()
    ch_i, ch_r, msgs = handshake(a, b)
    assert [len(m) for m in msgs] == [
        wire.HELLO_LEN,
        wire.RESPONSE_LEN,
        wire.AUTH_LEN,
        wire.VERDICT_LEN,
    ]
    assert ch_i.session_id == ch_r.session_id
    assert ch_i.remote == b.member and ch_r.remote == a.member
    for n in range(3):
        assert ch_r.open(ch_i.seal(wire.FRAME_DATA, b"i%d" % n)) == wire.Frame(0, b"i%d" % n)
        assert ch_i.open(ch_r.seal(wire.FRAME_DATA, b"r%d" % n)) == wire.Frame(0, b"r%d" % n)


def test_frames_cannot_be_replayed_reflected_reordered_or_moved_between_sessions() -> None:
    a, b = ident(), ident()
    ch_i, ch_r, _ = handshake(a, b)
    f0 = ch_i.seal(wire.FRAME_DATA, b"zero")
    f1 = ch_i.seal(wire.FRAME_DATA, b"one")
    with pytest.raises(wire.FrameError):
        ch_r.open(f1)  # reordered (and a failure is final for the link)
    ch_i, ch_r, _ = handshake(a, b)
    g0 = ch_i.seal(wire.FRAME_DATA, b"zero")
    assert ch_r.open(g0).body == b"zero"
    with pytest.raises(wire.FrameError):
        ch_r.open(g0)  # replayed
    # Reflection: what the initiator sends never opens at the initiator.
    ch_i, ch_r, _ = handshake(a, b)
    h0 = ch_i.seal(wire.FRAME_DATA, b"me")
    with pytest.raises(wire.FrameError):
        ch_i.open(h0)
    assert ch_r.open(h0).body == b"me"
    # Same two members, new session: frames from the old one are useless.
    _, ch_r_new, _ = handshake(a, b)
    with pytest.raises(wire.FrameError):
        ch_r_new.open(f0)


def test_wrong_network_is_told_at_hello() -> None:
    a, b = ident(), ident()
    i = wire.Initiator(a, b"net-one", os.urandom(32))
    r = wire.Responder(b, b"net-two", os.urandom(32))
    with pytest.raises(wire.NetworkMismatchError):
        r.read_hello(i.start())
    with pytest.raises(wire.NetworkMismatchError):
        i2 = wire.Initiator(a, b"net-one", os.urandom(32))
        i2.start()
        i2.read_response(wire.encode_reject(wire.Refusal.NETWORK_MISMATCH))


def test_network_id_is_bound_into_the_signatures() -> None:
    # Even a responder that skipped the tag check cannot make a cross-network session:
    # its signature covers a transcript that starts from its own network id.
    a, b = ident(), ident()
    i = wire.Initiator(a, b"net-one", os.urandom(32))
    r = wire.Responder(b, b"net-two", os.urandom(32))
    hello = i.start()
    forged = hello[:4] + wire.network_tag(b"net-two") + hello[36:]
    response = r.read_hello(forged)
    with pytest.raises((SignatureError, wire.HandshakeError)):
        i.read_response(response)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=3), st.data())
def test_any_flipped_bit_in_any_handshake_message_fails(which: int, data: st.DataObject) -> None:
    a, b = ident(), ident()
    i = wire.Initiator(a, NET, os.urandom(32))
    r = wire.Responder(b, NET, os.urandom(32))
    msgs: list[bytes] = []

    def deliver(msg: bytes) -> bytes:
        if len(msgs) == which:
            pos = data.draw(st.integers(min_value=0, max_value=len(msg) - 1))
            bit = data.draw(st.integers(min_value=0, max_value=7))
            msg = msg[:pos] + bytes((msg[pos] ^ (1 << bit),)) + msg[pos + 1 :]
        msgs.append(msg)
        return msg

    with pytest.raises(RemoteError):
        m2 = r.read_hello(deliver(i.start()))
        i.read_response(deliver(m2))
        m3 = deliver(i.auth())
        r.read_auth(m3)
        m4, ch_r = r.verdict()
        ch_i = i.read_verdict(deliver(m4))
        # A flipped bit in HELLO's ephemeral still yields a handshake, but not a shared key.
        assert ch_r is not None
        ch_r.open(ch_i.seal(wire.FRAME_DATA, b"x"))


def test_replayed_handshake_messages_fail_against_fresh_ephemerals() -> None:
    a, b = ident(), ident()
    _, _, old = handshake(a, b)
    r = wire.Responder(b, NET, os.urandom(32))
    fresh_response = r.read_hello(old[0])
    assert fresh_response != old[1]
    with pytest.raises(wire.HandshakeError):
        r.read_auth(old[2])
    i = wire.Initiator(a, NET, os.urandom(32))
    i.start()
    with pytest.raises(wire.HandshakeError):
        i.read_response(old[1])


def test_every_wrong_message_in_every_state_fails_and_failure_is_final() -> None:
    a, b = ident(), ident()
    _, _, msgs = handshake(a, b)  # one real message of each type
    by_type = dict(zip((wire.T_HELLO, wire.T_RESPONSE, wire.T_AUTH, wire.T_VERDICT), msgs, strict=True))

    def responder_at(step: int) -> tuple[wire.Responder, object]:
        i = wire.Initiator(a, NET, os.urandom(32))
        r = wire.Responder(b, NET, os.urandom(32))
        m2 = r.read_hello(i.start())
        if step == 0:
            return wire.Responder(b, NET, os.urandom(32)), wire.Responder.read_hello
        i.read_response(m2)
        return r, wire.Responder.read_auth

    def initiator_at(step: int) -> tuple[wire.Initiator, object]:
        i = wire.Initiator(a, NET, os.urandom(32))
        r = wire.Responder(b, NET, os.urandom(32))
        m2 = r.read_hello(i.start())
        if step == 0:
            return i, wire.Initiator.read_response
        i.read_response(m2)
        r.read_auth(i.auth())
        return i, wire.Initiator.read_verdict

    expected = {
        (wire.Responder.read_hello, wire.T_HELLO),
        (wire.Responder.read_auth, wire.T_AUTH),
        (wire.Initiator.read_response, wire.T_RESPONSE),
        (wire.Initiator.read_verdict, wire.T_VERDICT),
    }
    for make in (responder_at, initiator_at):
        for step in (0, 1):
            for t, msg in by_type.items():
                machine, method = make(step)
                if (method, t) in expected:
                    continue  # the right type from another session: covered by replay tests
                with pytest.raises(RemoteError):
                    method(machine, msg)  # type: ignore[operator]
                with pytest.raises(LocalError):
                    method(machine, msg)  # type: ignore[operator]


def test_low_order_ephemeral_is_refused() -> None:
    r = wire.Responder(ident(), NET, os.urandom(32))
    hello = wire.MAGIC + bytes((wire.VERSION, wire.T_HELLO)) + wire.network_tag(NET) + bytes(32)
    with pytest.raises(wire.HandshakeError):
        r.read_hello(hello)


def test_handshake_steps_out_of_order_are_local_errors() -> None:
    i = wire.Initiator(ident(), NET, os.urandom(32))
    with pytest.raises(LocalError):
        i.auth()
    with pytest.raises(LocalError):
        wire.Initiator(ident(), b"", os.urandom(32))


def test_docs_spec_interoperates_with_the_implementation() -> None:
    """An initiator written from docs/transport.md alone, against the real Responder."""
    import hashlib

    import nacl.bindings as na

    def h(*p: bytes) -> bytes:
        return hashlib.blake2b(b"".join(p), digest_size=32).digest()

    def kdf(k: bytes, label: bytes, ctx: bytes) -> bytes:
        return hashlib.blake2b(label + ctx, key=k, digest_size=32).digest()

    def nonce(n: int) -> bytes:
        return bytes(4) + n.to_bytes(8, "little")

    me, server = ident(), ident()
    net = b"spec-net"
    e_sec = os.urandom(32)
    e_i = na.crypto_scalarmult_base(e_sec)
    h0 = h(b"valuemesh peer handshake v2", bytes((len(net),)), net)
    hello = b"vm\x02\x01" + h(b"valuemesh network tag v1", net) + e_i
    r = wire.Responder(server, net, os.urandom(32))
    resp = r.read_hello(hello)
    h1 = h(h0, hello)
    e_r = resp[4:36]
    dh = na.crypto_scalarmult(e_sec, e_r)
    plain = na.crypto_aead_chacha20poly1305_ietf_decrypt(
        resp[36:], h1 + e_r, nonce(0), kdf(dh, b"vm2 responder auth", h1 + e_r)
    )
    assert plain[:32] == server.member.key
    server.member.verify(b"vm2 responder sig" + h1 + e_r + plain[:32], plain[32:])
    h2 = h(h1, resp)
    sig = me.sign(b"vm2 initiator sig" + h2 + server.member.key + me.member.key)
    auth = b"vm\x02\x03" + na.crypto_aead_chacha20poly1305_ietf_encrypt(
        me.member.key + sig, h2, nonce(0), kdf(dh, b"vm2 initiator auth", h2)
    )
    assert r.read_auth(auth) == me.member
    h3 = h(h2, auth)
    verdict, ch = r.verdict()
    assert ch is not None and ch.session_id == h3
    body = na.crypto_aead_chacha20poly1305_ietf_decrypt(
        verdict[4:], h3, nonce(0), kdf(dh, b"vm2 verdict", h3)
    )
    assert body == bytes(5)
    k_i2r, k_r2i = kdf(dh, b"vm2 traffic i2r", h3), kdf(dh, b"vm2 traffic r2i", h3)
    frame = na.crypto_aead_chacha20poly1305_ietf_encrypt(b"\x00payload", b"", nonce(0), k_i2r)
    assert ch.open(frame) == wire.Frame(wire.FRAME_DATA, b"payload")
    reply = ch.seal(wire.FRAME_PING, b"abc")
    assert na.crypto_aead_chacha20poly1305_ietf_decrypt(reply, b"", nonce(0), k_r2i) == b"\x01abc"


# -- network helpers ---------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_peer_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """A hand-written server on PEER_PATH at 127.0.0.1; yields its port."""
    app = web.Application()
    app.router.add_get(PEER_PATH, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as c:
        yield c


class RawPeer:
    """A hostile client speaking the wire format directly over a plain aiohttp websocket."""

    def __init__(self, identity: Identity | None = None, net: bytes = NET) -> None:
        self.identity = identity or ident()
        self.net = net
        self.session = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.channel: wire.SecureChannel | None = None
        self.sent: list[bytes] = []

    async def open(self, addr: tuple[str, int], max_msg_size: int = 64 << 20) -> None:
        url = f"http://{addr[0]}:{addr[1]}{PEER_PATH}"
        self.ws = await self.session.ws_connect(url, max_msg_size=max_msg_size, autoping=True)

    async def send(self, data: bytes) -> None:
        assert self.ws is not None
        self.sent.append(data)
        await self.ws.send_bytes(data)

    async def receive(self, timeout: float = 5.0) -> aiohttp.WSMessage:
        assert self.ws is not None
        return await self.ws.receive(timeout=timeout)

    async def handshake(self, addr: tuple[str, int]) -> wire.SecureChannel:
        await self.open(addr)
        i = wire.Initiator(self.identity, self.net, os.urandom(32))
        await self.send(i.start())
        i.read_response((await self.receive()).data)
        await self.send(i.auth())
        self.channel = i.read_verdict((await self.receive()).data)
        return self.channel

    async def send_frame(self, kind: int, body: bytes) -> bytes:
        assert self.channel is not None
        frame = self.channel.seal(kind, body)
        await self.send(frame)
        return frame

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Read until the server closes the socket; True if it did within the timeout."""
        assert self.ws is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for _ in range(100_000):
                    msg = await self.ws.receive()
                    if msg.type in (
                        aiohttp.WSMsgType.CLOSE,
                        aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR,
                    ):
                        return True
        return False

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2.0)
        await self.session.close()


@pytest.fixture
async def raw() -> AsyncIterator[list[RawPeer]]:
    peers: list[RawPeer] = []
    try:
        yield peers
    finally:
        for p in peers:
            await p.close()


def new_raw(peers: list[RawPeer], **kw: object) -> RawPeer:
    p = RawPeer(**kw)  # type: ignore[arg-type]
    peers.append(p)
    return p


# -- two honest transports ---------------------------------------------------


async def test_two_transports_exchange_messages_both_ways_in_order(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    link = await a.transport.connect(*b.addr, expect=b.member)
    assert link.remote == b.member and not link.inbound
    await until(lambda: b.transport.link(a.member) is not None, "b sees the link")
    back = b.transport.link(a.member)
    assert back is not None and back.inbound and back.session_id == link.session_id
    payloads = [os.urandom(n) for n in (0, 1, 100, 65_536, 1_000_000)] + [b"%d" % n for n in range(200)]
    for p in payloads:
        await link.send(p)
    got = [await recv(b) for _ in payloads]
    assert got == [(a.member, p) for p in payloads]
    for p in payloads[:20]:
        await back.send(p)
    assert [await recv(a) for _ in payloads[:20]] == [(b.member, p) for p in payloads[:20]]
    assert a.handler.count("connect", b.member) == 1 and b.handler.count("connect", a.member) == 1
    link.close("test over")
    await until(lambda: b.handler.count("disconnect", a.member) == 1, "b sees the close")
    reasons = [r for k, _, r in b.handler.events if k == "disconnect"]
    assert reasons == ["closed by the peer: test over"]
    with pytest.raises(LinkClosedError):
        await link.send(b"late")


async def test_oversized_payload_is_refused_locally(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    link = await a.transport.connect(*b.addr)
    with pytest.raises(LocalError):
        await link.send(bytes(FAST.max_payload + 1))
    await exchange(a, b, b"still fine")


async def test_wrong_network_id_is_refused_with_a_clear_error(cluster: Cluster) -> None:
    a = await cluster.node(net=b"network-a")
    b = await cluster.node(net=b"network-b")
    with pytest.raises(wire.NetworkMismatchError, match="different network"):
        await a.transport.connect(*b.addr)
    assert not a.transport.links and not b.transport.links
    assert b.handler.events == [] and a.handler.events == []
    # Misconfiguration is not misbehaviour: nobody is backed off.
    assert b.transport.banned_for("127.0.0.1") == 0


async def test_unauthorised_keys_are_refused_both_ways(cluster: Cluster) -> None:
    outsider = ident()
    b = await cluster.node(allow=set())
    a = await cluster.node(identity=outsider)
    with pytest.raises(wire.PeerRefusedError, match="does not authorise") as err:
        await a.transport.connect(*b.addr)
    assert err.value.code is wire.Refusal.NOT_AUTHORISED
    assert not b.transport.links and b.handler.events == []
    # The dialler refuses too: c only talks to members it knows.
    c = await cluster.node(allow=set())
    with pytest.raises(AuthorizationError):
        await c.transport.connect(*a.addr)
    # a sees c hang up after RESPONSE: a small charge to the address, no link.
    await until(
        lambda: a.transport.ip_reputation.score("127.0.0.1", a.transport.clock())
        < FAST.reputation.start,
        "a noticed c hang up",
    )
    assert not c.transport.links and not a.transport.links and a.handler.events == []


async def test_expected_key_mismatch_is_refused(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    with pytest.raises(wire.HandshakeError, match="presents key"):
        await a.transport.connect(*b.addr, expect=ident().member)
    assert not a.transport.links

    def ip_score() -> float:
        return b.transport.ip_reputation.score("127.0.0.1", b.transport.clock())

    # b saw a dialler hang up, not an attack: a small charge, no back-off.
    start = FAST.reputation.start
    await until(lambda: ip_score() < start, "b noticed the abandoned handshake")
    assert start - FAST.handshake_abandon_penalty <= ip_score() < start
    assert not b.transport.links and b.handler.events == []


async def test_connecting_to_itself_is_refused(cluster: Cluster) -> None:
    a = await cluster.node()
    with pytest.raises(LocalError, match="itself"):
        await a.transport.connect(*a.addr)
    assert not a.transport.links


async def test_simultaneous_dials_leave_one_link_both_sides_agree_on(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    la, lb = await asyncio.gather(a.transport.connect(*b.addr), b.transport.connect(*a.addr))
    assert la.remote == b.member and lb.remote == a.member
    await until(
        lambda: len(a.transport.links) == 1
        and len(b.transport.links) == 1
        and a.transport.links[b.member].session_id == b.transport.links[a.member].session_id,
        "one agreed link",
    )
    lower = min(a.member, b.member)
    kept = a.transport.links[b.member]
    assert (kept.remote if kept.inbound else a.member) == lower
    await exchange(a, b, b"after race")


async def test_full_mesh_of_crossing_dials_settles_on_one_link_per_pair(cluster: Cluster) -> None:
    nodes = [await cluster.node() for _ in range(5)]
    dials = [x.transport.connect(*y.addr) for x in nodes for y in nodes if x is not y]
    results = await asyncio.gather(*dials, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]

    def settled() -> bool:
        for x in nodes:
            if len(x.transport.links) != len(nodes) - 1:
                return False
            for y in nodes:
                if x is not y:
                    lx, ly = x.transport.link(y.member), y.transport.link(x.member)
                    if lx is None or ly is None or lx.session_id != ly.session_id:
                        return False
        return True

    await until(settled, "one agreed link per pair")
    for x in nodes:
        for y in nodes:
            if x is not y:
                assert x.handler.count("connect", y.member) - x.handler.count(
                    "disconnect", y.member
                ) == 1
    await exchange(nodes[0], nodes[4], b"mesh")
    await exchange(nodes[2], nodes[3], b"mesh")
    live = nodes[0].transport.link(nodes[1].member)
    assert await nodes[0].transport.connect(*nodes[1].addr, expect=nodes[1].member) is live


async def test_redial_replaces_the_old_link(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    first = await a.transport.connect(*b.addr)
    second = await a.transport.connect(*b.addr)
    assert second is not first and first.closed
    await until(
        lambda: (lk := b.transport.link(a.member)) is not None and lk.session_id == second.session_id,
        "b switched to the new link",
    )
    assert b.handler.count("disconnect", a.member) == 1 and b.handler.count("connect", a.member) == 2
    assert len(b.transport.links) == 1
    await exchange(a, b, b"redialled")


async def test_silent_server_and_foreign_http_server_fail_cleanly(cluster: Cluster) -> None:
    limits = replace(FAST, connect_timeout=0.5)
    a = await cluster.node(limits=limits)
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = silent.sockets[0].getsockname()[1]
        with pytest.raises(PeerUnreachableError, match="did not complete"):
            await a.transport.connect("127.0.0.1", port)
        http_port = runner.addresses[0][1]
        with pytest.raises(PeerUnreachableError, match="not a valuemesh peer"):
            await a.transport.connect("127.0.0.1", http_port)
    finally:
        for w in held:
            w.close()
        silent.close()
        await silent.wait_closed()
        await runner.cleanup()
    assert not a.transport.links


async def test_hostile_server_answers_are_rejected_by_the_client(cluster: Cluster) -> None:
    a = await cluster.node()
    answers = [os.urandom(wire.RESPONSE_LEN), b"vm\x02\x02" + os.urandom(wire.RESPONSE_LEN - 4)]

    async def serve(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.send_bytes(answers.pop(0))
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get(PEER_PATH, serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        for _ in range(2):
            with pytest.raises(wire.HandshakeError):
                await a.transport.connect("127.0.0.1", port)
    finally:
        await runner.cleanup()
    assert not a.transport.links and a.handler.events == []


async def test_ipv6_loopback(cluster: Cluster) -> None:
    a = await cluster.node()
    identity = ident()
    handler = Recorder()
    t = Transport(identity, NET, handler, limits=FAST)
    try:
        addr = await t.start("::1", 0)
    except LocalError:
        pytest.skip("no IPv6 loopback here")
    cluster.nodes.append(Node(identity, handler, t, addr))
    link = await a.transport.connect(*addr, expect=identity.member)
    await link.send(b"over v6")
    assert await recv(cluster.nodes[-1]) == (a.member, b"over v6")


async def test_listening_on_all_interfaces_takes_ipv4_and_ipv6_on_one_port(cluster: Cluster) -> None:
    """`::` is both families (asyncio makes IPv6 sockets IPv6-only, so IPv4 gets its own):
    one node is dialled on 127.0.0.1 and on ::1 at the same port. Only loopback is dialled."""
    a = await cluster.node()
    identity, handler = ident(), Recorder()
    t = Transport(identity, NET, handler, limits=FAST)
    host, port = await t.start("::", 0)
    both = Node(identity, handler, t, (host, port))
    cluster.nodes.append(both)
    link4 = await a.transport.connect("127.0.0.1", port, expect=identity.member)
    await link4.send(b"over v4")
    assert await recv(both) == (a.member, b"over v4")
    if host != "::":
        pytest.skip("no IPv6 here: the node listens on IPv4 alone")
    b = await cluster.node()
    link6 = await b.transport.connect("::1", port, expect=identity.member)
    await link6.send(b"over v6")
    assert await recv(both) == (b.member, b"over v6")
    with pytest.raises(LocalError, match="Cannot listen"):  # the port is taken in both families
        await Transport(ident(), NET, Recorder(), limits=FAST).start("::", port)


async def test_a_crossing_dial_returns_the_live_link_both_ends_keep(cluster: Cluster) -> None:
    while True:
        lo, hi = ident(), ident()
        if lo.member < hi.member:
            break
    a, b = await cluster.node(identity=lo), await cluster.node(identity=hi)
    first = await a.transport.connect(*b.addr)
    again = await b.transport.connect(*a.addr)
    assert again.session_id == first.session_id and again.inbound
    await until(lambda: len(a.transport.links) == 1 and len(b.transport.links) == 1, "one link")
    assert a.transport.links[b.member] is first and not first.closed
    assert a.handler.count("connect", b.member) == 1 and b.handler.count("connect", a.member) == 1
    await exchange(a, b, b"crossed")


async def test_a_stale_link_that_no_longer_answers_loses_to_a_new_dial(cluster: Cluster) -> None:
    # s dialled x, so on a crossing dial s's own link would normally win (lower key);
    # here x went silent (a crash s has not noticed), so x's new dial must win.
    while True:
        s_id, x_id = ident(), ident()
        if s_id.member < x_id.member:
            break
    s = await cluster.node(identity=s_id)

    async def silent_responder(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        r = wire.Responder(x_id, NET, os.urandom(32))
        await ws.send_bytes(r.read_hello((await ws.receive()).data))
        r.read_auth((await ws.receive()).data)
        await ws.send_bytes(r.verdict()[0])
        with contextlib.suppress(Exception):
            for _ in range(100_000):  # swallow everything, answer nothing
                if (await ws.receive()).type != aiohttp.WSMsgType.BINARY:
                    break
        return ws

    async with fake_peer_server(silent_responder) as port:
        stale = await s.transport.connect("127.0.0.1", port)
        assert stale.remote == x_id.member and not stale.inbound
        x = await cluster.node(identity=x_id)
        fresh = await x.transport.connect(*s.addr)
        await until(
            lambda: (lk := s.transport.link(x_id.member)) is not None and lk.inbound,
            "the new inbound link replaced the stale one",
        )
        assert stale.closed and not fresh.closed
        await exchange(s, x, b"after stale")


# -- hostile peers -------------------------------------------------------------


async def honest_pair(cluster: Cluster) -> tuple[Node, Node]:
    server, honest = await cluster.node(), await cluster.node()
    await honest.transport.connect(*server.addr)
    await until(lambda: server.transport.link(honest.member) is not None, "honest link up")
    return server, honest


async def assert_cut_off(server: Node, bad: RawPeer) -> None:
    assert await bad.closed_by_server()
    await until(lambda: server.transport.link(bad.identity.member) is None, "bad link gone")
    assert server.transport.banned_for(bad.identity.member) > 0
    assert server.transport.banned_for("127.0.0.1") > 0


async def test_garbage_frame_cuts_the_peer_off_and_honest_peer_keeps_working(
    cluster: Cluster, raw: list[RawPeer]
) -> None:
    server, honest = await honest_pair(cluster)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    await bad.send_frame(wire.FRAME_DATA, b"valid first")
    assert await recv(server) == (bad.identity.member, b"valid first")
    await bad.send(os.urandom(200))
    await assert_cut_off(server, bad)
    assert server.handler.messages.empty()
    await exchange(server, honest, b"after garbage")
    # The backed-off key cannot simply come back.
    again = new_raw(raw, identity=bad.identity)
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await again.open(server.addr)
    assert err.value.status == 429


async def test_tampered_ciphertext_is_rejected(cluster: Cluster, raw: list[RawPeer]) -> None:
    server, honest = await honest_pair(cluster)
    bad = new_raw(raw)
    ch = await bad.handshake(server.addr)
    frame = bytearray(ch.seal(wire.FRAME_DATA, b"pay me 100"))
    frame[3] ^= 0x01
    await bad.send(bytes(frame))
    await assert_cut_off(server, bad)
    assert server.handler.messages.empty()
    await exchange(server, honest, b"after tamper")


async def test_replayed_frame_is_rejected(cluster: Cluster, raw: list[RawPeer]) -> None:
    server, honest = await honest_pair(cluster)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    frame = await bad.send_frame(wire.FRAME_DATA, b"once")
    assert await recv(server) == (bad.identity.member, b"once")
    await bad.send(frame)
    await assert_cut_off(server, bad)
    assert server.handler.messages.empty()
    await exchange(server, honest, b"after replay")


async def test_oversized_frame_is_rejected(cluster: Cluster, raw: list[RawPeer]) -> None:
    limits = replace(FAST, max_payload=1024)
    server = await cluster.node(limits=limits)
    honest = await cluster.node(limits=limits)
    await honest.transport.connect(*server.addr)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    await bad.send_frame(wire.FRAME_DATA, bytes(2048))
    await assert_cut_off(server, bad)
    assert server.handler.messages.empty()
    await exchange(server, honest, b"after oversize")


async def test_text_message_is_rejected(cluster: Cluster, raw: list[RawPeer]) -> None:
    server, honest = await honest_pair(cluster)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    assert bad.ws is not None
    await bad.ws.send_str("hello?")
    await assert_cut_off(server, bad)
    await exchange(server, honest, b"after text")


async def test_replayed_handshake_is_refused(cluster: Cluster, raw: list[RawPeer]) -> None:
    server, honest = await honest_pair(cluster)
    victim_id = ident()
    victim = victim_id.member
    recorded = new_raw(raw, identity=victim_id)
    await recorded.handshake(server.addr)
    await until(lambda: server.transport.link(victim) is not None, "recorded session up")
    hello, auth = recorded.sent[0], recorded.sent[1]
    attacker = new_raw(raw)
    await attacker.open(server.addr)
    await attacker.send(hello)
    response = await attacker.receive()
    assert response.type == aiohttp.WSMsgType.BINARY and len(response.data) == wire.RESPONSE_LEN
    await attacker.send(auth)
    assert await attacker.closed_by_server()
    # The replay made no session: the victim's one link is the recorded one, connected once.
    assert server.handler.count("connect", victim) == 1
    assert server.transport.link(victim) is not None
    assert server.transport.banned_for(victim) == 0
    await exchange(server, honest, b"after replay")


async def test_impersonation_with_a_wrong_signature_is_refused(
    cluster: Cluster, raw: list[RawPeer]
) -> None:
    """A peer claims a member's key in AUTH but can only sign with its own."""
    import hashlib

    import nacl.bindings as na

    server, honest = await honest_pair(cluster)
    victim, mallory = ident(), ident()

    def h(*p: bytes) -> bytes:
        return hashlib.blake2b(b"".join(p), digest_size=32).digest()

    def kdf(k: bytes, label: bytes, ctx: bytes) -> bytes:
        return hashlib.blake2b(label + ctx, key=k, digest_size=32).digest()

    bad = new_raw(raw, identity=mallory)
    await bad.open(server.addr)
    e_sec = os.urandom(32)
    hello = b"vm\x02\x01" + wire.network_tag(NET) + na.crypto_scalarmult_base(e_sec)
    await bad.send(hello)
    resp = (await bad.receive()).data
    h1 = h(h(b"valuemesh peer handshake v2", bytes((len(NET),)), NET), hello)
    dh = na.crypto_scalarmult(e_sec, resp[4:36])
    h2 = h(h1, resp)
    sig = mallory.sign(b"vm2 initiator sig" + h2 + server.member.key + victim.member.key)
    auth = b"vm\x02\x03" + na.crypto_aead_chacha20poly1305_ietf_encrypt(
        victim.member.key + sig, h2, bytes(12), kdf(dh, b"vm2 initiator auth", h2)
    )
    await bad.send(auth)
    assert await bad.closed_by_server()
    assert server.transport.link(victim.member) is None
    assert server.handler.count("connect", victim.member) == 0
    # The forger's address pays; the impersonated member is not blamed.
    assert server.transport.banned_for(victim.member) == 0
    assert server.transport.ip_reputation.score(
        "127.0.0.1", server.transport.clock()
    ) < FAST.reputation.start
    await exchange(server, honest, b"after impersonation")


async def test_garbage_handshake_is_refused_and_counts_against_the_address(
    cluster: Cluster, raw: list[RawPeer]
) -> None:
    server, honest = await honest_pair(cluster)
    before = server.transport.ip_reputation.score("127.0.0.1", server.transport.clock())
    bad = new_raw(raw)
    await bad.open(server.addr)
    await bad.send(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(64))
    assert await bad.closed_by_server()
    after = server.transport.ip_reputation.score("127.0.0.1", server.transport.clock())
    assert after < before
    assert server.handler.count("connect", bad.identity.member) == 0
    await exchange(server, honest, b"after garbage handshake")


async def test_silent_handshake_times_out(cluster: Cluster, raw: list[RawPeer]) -> None:
    limits = replace(FAST, handshake_timeout=0.3)
    server = await cluster.node(limits=limits)
    bad = new_raw(raw)
    await bad.open(server.addr)
    assert await bad.closed_by_server(timeout=5.0)
    assert server.transport.links == {}


async def test_flood_is_throttled_then_cut_off(cluster: Cluster, raw: list[RawPeer]) -> None:
    limits = replace(FAST,
            rate_messages=100.0,
            burst_messages=20.0,
            flood_grace=0.2,
            flood_penalty=40.0,
        )
    server = await cluster.node(limits=limits)
    honest = await cluster.node(limits=limits)
    await honest.transport.connect(*server.addr)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        for _ in range(20_000):
            await bad.send_frame(wire.FRAME_DATA, b"spam")
            sent += 1
            if bad.ws is None or bad.ws.closed or server.transport.link(bad.identity.member) is None:
                break
    await until(lambda: server.transport.link(bad.identity.member) is None, "flooder cut off")
    elapsed = loop.time() - start
    delivered = 0
    while not server.handler.messages.empty():
        who, _ = server.handler.messages.get_nowait()
        delivered += who == bad.identity.member
    # Throttled: never more delivered than the bucket allows over the time it ran.
    assert delivered <= limits.burst_messages + limits.rate_messages * elapsed + 1
    assert delivered < sent
    assert server.transport.banned_for(bad.identity.member) > 0
    reasons = [r for k, m, r in server.handler.events if k == "disconnect" and m == bad.identity.member]
    assert reasons and "flooding" in reasons[0]
    await exchange(server, honest, b"after flood")


async def test_websocket_ping_flood_passes_the_rate_limiter_too(
    cluster: Cluster, raw: list[RawPeer]
) -> None:
    limits = replace(
        FAST, rate_messages=100.0, burst_messages=20.0, flood_grace=0.2, flood_penalty=40.0
    )
    server = await cluster.node(limits=limits)
    honest = await cluster.node(limits=limits)
    await honest.transport.connect(*server.addr)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    assert bad.ws is not None
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        for _ in range(20_000):
            await bad.ws.ping(b"x")
            if bad.ws.closed or server.transport.link(bad.identity.member) is None:
                break
    await until(lambda: server.transport.link(bad.identity.member) is None, "pinger cut off")
    assert server.transport.banned_for(bad.identity.member) > 0
    await exchange(server, honest, b"after ping flood")


async def test_bulk_transfer_over_the_byte_rate_is_slowed_not_punished(cluster: Cluster) -> None:
    limits = replace(
        FAST, rate_bytes=1024 * 1024, burst_bytes=64 * 1024, flood_grace=0.2, flood_penalty=60.0
    )
    server = await cluster.node(limits=limits)
    client = await cluster.node(limits=limits)
    link = await client.transport.connect(*server.addr)
    chunks = [bytes([n]) * (64 * 1024) for n in range(16)]
    for c in chunks:
        await link.send(c)
    assert [await recv(server) for _ in chunks] == [(client.member, c) for c in chunks]
    inbound = server.transport.link(client.member)
    assert inbound is not None and inbound.throttled > 0
    assert not inbound.closed and server.transport.banned_for(client.member) == 0
    assert inbound.score == limits.reputation.start


async def test_upper_layer_penalties_disconnect_and_back_off(cluster: Cluster) -> None:
    server, honest = await honest_pair(cluster)
    rogue = await cluster.node()
    link = await rogue.transport.connect(*server.addr)
    server.handler.invalid_prefix = b"bad:"
    per_message = FAST.invalid_message_penalty
    needed = int(FAST.reputation.start // per_message) + 1
    for n in range(needed):
        with contextlib.suppress(LinkClosedError):
            await link.send(b"bad:%d" % n)
    await until(lambda: link.closed, "rogue disconnected")
    assert server.transport.banned_for(rogue.member) > 0
    with pytest.raises(wire.PeerRefusedError) as err:
        await rogue.transport.connect(*server.addr)
    assert err.value.code is wire.Refusal.BACKED_OFF and err.value.retry_after > 0
    server.handler.invalid_prefix = None
    await exchange(server, honest, b"after penalties")


async def test_back_off_expires_on_the_injected_clock_and_then_grows(cluster: Cluster) -> None:
    now = [1000.0]
    server = await cluster.node(clock=lambda: now[0])
    client = await cluster.node()
    link = await client.transport.connect(*server.addr)
    remote = server.transport.link(client.member)
    assert remote is not None
    remote.penalize(1_000, "test")
    await until(lambda: link.closed, "link closed by penalty")
    first = server.transport.banned_for(client.member)
    assert first == FAST.reputation.backoff_base
    with pytest.raises(wire.PeerRefusedError):
        await client.transport.connect(*server.addr)
    now[0] += first + 1
    link = await client.transport.connect(*server.addr)
    remote = server.transport.link(client.member)
    assert remote is not None
    remote.penalize(1_000, "test again")
    await until(lambda: link.closed, "closed again")
    assert server.transport.banned_for(client.member) == 2 * first


async def test_backpressure_bounds_the_queue_and_drops_a_stalled_peer(cluster: Cluster) -> None:
    limits = replace(FAST,
            send_queue_frames=8,
            send_queue_bytes=256 * 1024,
            send_timeout=0.5,
            idle_timeout=20.0,
        )
    sender = await cluster.node(limits=limits)
    slow = await cluster.node(limits=limits)
    slow.handler.stall = asyncio.Event()
    link = await sender.transport.connect(*slow.addr)
    await until(lambda: slow.transport.link(sender.member) is not None, "inbound link up")
    inbound = slow.transport.link(sender.member)
    assert inbound is not None
    chunk = bytes(64 * 1024)
    peak = 0
    sent = 0
    with pytest.raises(LinkClosedError, match="did not keep up"):
        for _ in range(10_000):
            await link.send(chunk)
            sent += 1
            peak = max(peak, link.queued_bytes)
    assert peak <= limits.send_queue_bytes
    assert link.closed and sent < 10_000
    # The stalled receiver took in one frame and left the rest in bounded socket buffers.
    assert inbound.frames_in <= 2
    slow.handler.stall.set()
    await link.wait_closed()
    reasons = [r for k, _, r in sender.handler.events if k == "disconnect"]
    assert reasons and "keep up" in reasons[0]


async def test_try_send_reports_a_full_queue_and_everything_arrives_after(
    cluster: Cluster,
) -> None:
    limits = replace(FAST, send_queue_frames=4, send_queue_bytes=128 * 1024, send_timeout=5.0)
    sender = await cluster.node(limits=limits)
    slow = await cluster.node(limits=limits)
    slow.handler.stall = asyncio.Event()
    link = await sender.transport.connect(*slow.addr)
    chunk = bytes(32 * 1024)
    accepted = 0
    for _ in range(10_000):
        if not link.try_send(chunk + accepted.to_bytes(4, "big")):
            break
        accepted += 1
        assert link.queued_bytes <= limits.send_queue_bytes + 4
        if accepted % 4 == 0:
            await asyncio.sleep(0)  # let the writer push into the socket
    assert 0 < accepted < 10_000 and not link.closed
    slow.handler.stall.set()
    got = [await recv(slow) for _ in range(accepted)]
    assert [int.from_bytes(p[-4:], "big") for _, p in got] == list(range(accepted))


async def test_idle_peer_is_dropped_but_quiet_honest_links_stay(
    cluster: Cluster, raw: list[RawPeer]
) -> None:
    limits = replace(FAST, ping_interval=0.1, idle_timeout=0.6)
    server = await cluster.node(limits=limits)
    honest = await cluster.node(limits=limits)
    await honest.transport.connect(*server.addr)
    bad = new_raw(raw)
    await bad.handshake(server.addr)
    assert await bad.closed_by_server(timeout=10.0)
    reasons = [r for k, m, r in server.handler.events if k == "disconnect" and m == bad.identity.member]
    assert reasons and reasons[0].startswith("idle")
    # The honest pair said nothing for longer than the idle timeout, but pings kept it up.
    await exchange(server, honest, b"quiet but alive")
    assert server.transport.banned_for(bad.identity.member) == 0


async def test_stop_closes_links_and_the_peer_sees_why(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    await a.transport.connect(*b.addr)
    await until(lambda: b.transport.link(a.member) is not None, "up")
    await a.transport.stop()
    await until(lambda: b.handler.count("disconnect", a.member) == 1, "b notified")
    assert "stopping" in next(r for k, _, r in b.handler.events if k == "disconnect")
    assert a.handler.count("disconnect", b.member) == 1
    with pytest.raises(LocalError):
        await a.transport.connect(*b.addr)


async def test_unreachable_and_backed_off_dials_fail_cleanly(cluster: Cluster) -> None:
    a = await cluster.node()
    b = await cluster.node()
    addr = b.addr
    await b.transport.stop()
    with pytest.raises(PeerUnreachableError):
        await a.transport.connect(*addr)
    a.transport.ban(b.member, "test", ip=None)
    with pytest.raises(BackedOffError):
        await a.transport.connect(*addr, expect=b.member)


# -- carriers: a length-prefixed stream adopted in a given role, paths, rtt --------------


async def stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    asyncio.Server,
]:
    """Two ends of one TCP connection on 127.0.0.1 (as a hole punch leaves them)."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result((r, w))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dialled = await asyncio.open_connection("127.0.0.1", port)
    return dialled, await accepted, server


async def test_a_stream_adopted_in_given_roles_carries_a_link_and_measures_rtt(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node(), await cluster.node()
    (ra, wa), (rb, wb), server = await stream_pair()
    try:
        # The side that accepted the TCP connection initiates: roles come from the caller.
        la, lb = await asyncio.gather(
            a.transport.adopt_stream(ra, wa, initiator=False, expect=b.member),
            b.transport.adopt_stream(rb, wb, initiator=True, expect=a.member),
        )
        assert la.path == lb.path == "punched" and la.via is None
        assert la.inbound and not lb.inbound
        assert la.session_id == lb.session_id
        await exchange(a, b, b"stream")
        await until(lambda: la.rtt is not None and lb.rtt is not None, "first round trips")
        assert la.rtt is not None and 0 < la.rtt < 5
        big = os.urandom(FAST.max_payload)
        await la.send(big)
        assert await recv(b) == (a.member, big)
        la.close("done")
        await until(lambda: lb.closed, "peer saw the close")
        assert lb.close_reason is not None and "done" in lb.close_reason
    finally:
        server.close()


async def test_an_adopted_stream_presenting_another_key_is_refused(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    stranger = ident()
    (ra, wa), (rb, wb), server = await stream_pair()
    try:
        results = await asyncio.gather(
            a.transport.adopt_stream(ra, wa, initiator=True, expect=stranger.member),
            b.transport.adopt_stream(rb, wb, initiator=False, expect=a.member),
            return_exceptions=True,
        )
        assert isinstance(results[0], wire.HandshakeError) and "presents key" in str(results[0])
        assert isinstance(results[1], (RemoteError, PeerUnreachableError))
        assert a.transport.links == {} and b.transport.links == {}
        # And a responder refuses an initiator that is not the one it expects.
        (ra, wa), (rb, wb), server2 = await stream_pair()
        results = await asyncio.gather(
            a.transport.adopt_stream(ra, wa, initiator=True, expect=b.member),
            b.transport.adopt_stream(rb, wb, initiator=False, expect=stranger.member),
            return_exceptions=True,
        )
        server2.close()
        assert isinstance(results[0], wire.PeerRefusedError)
        assert results[0].code is wire.Refusal.NOT_AUTHORISED
        assert isinstance(results[1], wire.PeerRefusedError)
        assert a.transport.links == {} and b.transport.links == {}
    finally:
        server.close()


async def test_a_stream_peer_that_never_speaks_is_bounded_by_the_handshake_timeout(
    cluster: Cluster,
) -> None:
    a = await cluster.node(limits=replace(FAST, handshake_timeout=0.3))
    (ra, wa), (_rb, wb), server = await stream_pair()
    try:
        with pytest.raises(PeerUnreachableError, match="did not complete the handshake"):
            await a.transport.adopt_stream(ra, wa, initiator=False, expect=ident().member)
        assert wa.is_closing()
    finally:
        wb.close()
        server.close()


async def test_an_oversized_stream_length_is_refused_before_buffering(cluster: Cluster) -> None:
    limits = replace(FAST, max_payload=1024)
    a = await cluster.node(limits=limits)
    (ra, wa), (rb, wb), server = await stream_pair()
    try:
        wb.write((limits.max_frame + 1).to_bytes(4, "big"))
        await wb.drain()
        with pytest.raises(wire.HandshakeError, match="larger than"):
            await a.transport.adopt_stream(ra, wa, initiator=False, expect=ident().member)
        assert await rb.read() == b""  # closed by a
    finally:
        wb.close()
        server.close()


async def test_websocket_links_say_direct_and_learn_their_rtt(cluster: Cluster) -> None:
    a, b = await cluster.node(), await cluster.node()
    link = await a.transport.connect(*b.addr)
    assert link.path == "direct" and link.via is None
    await until(lambda: link.rtt is not None, "first round trip")
    rtt = await link.ping(2.0)
    assert link.rtt == rtt


# -- wire version 2 against a version-1 peer -----------------------------------------------


async def test_a_version_1_dialler_is_refused_with_the_version_code_and_one_clear_line(
    cluster: Cluster, raw: list[RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    server = await cluster.node()
    old = new_raw(raw)
    await old.open(server.addr)
    hello_v1 = b"vm\x01\x01" + wire.network_tag(NET) + os.urandom(32)
    with caplog.at_level("INFO", logger="valuemesh.transport"):
        await old.send(hello_v1)
        msg = await old.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY
        # What a version-1 node reads: a REJECT (type 0xFF) with code 2, unsupported version.
        assert msg.data[:2] == b"vm" and msg.data[3] == wire.T_REJECT
        assert msg.data[4] == wire.Refusal.UNSUPPORTED_VERSION
        await until(lambda: "speaks version 1" in caplog.text, "the responder's log line")
    lines = [r.getMessage() for r in caplog.records if "speaks version 1" in r.getMessage()]
    assert lines == [
        f"inbound handshake from 127.0.0.1 failed: The peer speaks version 1 of the peer "
        f"protocol; this node speaks only version {wire.VERSION}."
    ]
    assert server.transport.links == {}
    assert server.transport.banned_for("127.0.0.1") == 0  # a refusal costs nothing


async def test_dialling_a_version_1_node_says_so_in_one_sentence(cluster: Cluster) -> None:
    a = await cluster.node()

    async def v1_responder(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = (await ws.receive()).data
        assert hello[2] == wire.VERSION  # a version-1 node refuses anything else
        await ws.send_bytes(b"vm\x01\xff\x02\x00\x00\x00\x00")
        await ws.close()
        return ws

    async with fake_peer_server(v1_responder) as port:
        with pytest.raises(wire.VersionMismatchError) as err:
            await a.transport.connect("127.0.0.1", port)
        assert str(err.value) == (
            f"The peer speaks version 1 of the peer protocol; this node speaks only version {wire.VERSION}."
        )
        assert err.value.code is wire.Refusal.UNSUPPORTED_VERSION
        assert a.transport.links == {}


def test_wire_vectors_in_docs_rederive_from_the_spec_alone() -> None:
    """docs/vectors.json "wire", rebuilt with hashlib and PyNaCl from docs/transport.md."""
    import hashlib
    import json
    from pathlib import Path

    import nacl.bindings as na
    import nacl.signing

    v = json.loads((Path(__file__).resolve().parent.parent / "docs" / "vectors.json").read_text())["wire"]

    def h(*p: bytes) -> bytes:
        return hashlib.blake2b(b"".join(p), digest_size=32).digest()

    def kdf(k: bytes, label: bytes, ctx: bytes) -> bytes:
        return hashlib.blake2b(label + ctx, key=k, digest_size=32).digest()

    def aead(k: bytes, n: int, p: bytes, ad: bytes) -> bytes:
        return bytes(na.crypto_aead_chacha20poly1305_ietf_encrypt(p, ad, bytes(4) + n.to_bytes(8, "little"), k))

    def key(label: str) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(hashlib.blake2b(label.encode(), digest_size=32).digest())

    alice, bob = key("alice"), key("bob")
    a_pub, b_pub = bytes(alice.verify_key), bytes(bob.verify_key)
    net = bytes.fromhex(v["network_id"])
    ei_s, er_s = bytes.fromhex(v["initiator_ephemeral_secret"]), bytes.fromhex(v["responder_ephemeral_secret"])
    e_i, e_r = na.crypto_scalarmult_base(ei_s), na.crypto_scalarmult_base(er_s)
    dh = na.crypto_scalarmult(ei_s, e_r)
    hello = b"vm\x02\x01" + h(b"valuemesh network tag v1", net) + e_i
    h1 = h(h(b"valuemesh peer handshake v2", bytes((len(net),)), net), hello)
    sig_r = bob.sign(b"vm2 responder sig" + h1 + e_r + b_pub).signature
    response = b"vm\x02\x02" + e_r + aead(kdf(dh, b"vm2 responder auth", h1 + e_r), 0, b_pub + sig_r, h1 + e_r)
    h2 = h(h1, response)
    sig_i = alice.sign(b"vm2 initiator sig" + h2 + b_pub + a_pub).signature
    auth = b"vm\x02\x03" + aead(kdf(dh, b"vm2 initiator auth", h2), 0, a_pub + sig_i, h2)
    h3 = h(h2, auth)
    verdict = b"vm\x02\x04" + aead(kdf(dh, b"vm2 verdict", h3), 0, bytes(5), h3)
    assert [hello.hex(), response.hex(), auth.hex(), verdict.hex(), h3.hex()] == [
        v["hello"], v["response"], v["auth"], v["verdict"], v["session_id"]
    ]
    k_i2r = kdf(dh, b"vm2 traffic i2r", h3)
    for f in v["frames"]:
        plain = bytes((f["kind"],)) + bytes.fromhex(f["body"])
        assert aead(k_i2r, f["counter"], plain, b"").hex() == f["frame"]
    c = {k: bytes.fromhex(x) for k, x in v["circuit"].items()}
    assert c["reserve"] == b"\x01" + bytes(4)
    assert c["reserved_ok"][:6] == b"\x02" + bytes(4) + b"\x00"
    assert c["open_1_to_bob"] == b"\x03\x00\x00\x00\x01" + b_pub
    assert c["incoming_responder_side_1_from_alice"] == b"\x04\x80\x00\x00\x01" + a_pub
    assert c["opened_1_refused"][:6] == b"\x05\x00\x00\x00\x01\x04"
    assert c["data_1"] == b"\x06\x00\x00\x00\x01" + hello
    assert c["close_1"] == b"\x07\x00\x00\x00\x01bye"
    assert c["credit_1"] == b"\x08\x00\x00\x00\x01" + (128 * 1024).to_bytes(4, "big")
