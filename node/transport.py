"""Peer links over aiohttp websockets: `Transport` listens on `/vm/peer`, dials, runs the
`valuemesh.protocol.wire` handshake, admits at most one live `PeerLink` per key, scores peers.

What one link does once admitted is node/link.py; the bounds and errors are node/link_limits.py.
A `LinkHandler` is what the node plugs in to receive opaque payloads and link events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from valuemesh.node.addresses import address_range
from valuemesh.node.admission import HandshakeSlots, Slot
from valuemesh.node.carrier import Carrier, CarrierViolation, StreamCarrier, WebSocketCarrier
from valuemesh.node.link import PeerLink
from valuemesh.node.link_limits import (
    BackedOffError,
    Limits,
    LinkClosedError,
    PeerUnreachableError,
)
from valuemesh.node.loglimit import LogLimiter, limit_accept_errors
from valuemesh.node.punch import check_port_free
from valuemesh.node.ratelimit import Reputation
from valuemesh.node.relay import MayRelay, Relaying
from valuemesh.protocol import wire
from valuemesh.protocol.errors import (
    AuthorizationError,
    LocalError,
    RemoteError,
    ValuemeshError,
)
from valuemesh.protocol.identity import Identity, MemberId

log = logging.getLogger("valuemesh.transport")

PEER_PATH = "/vm/peer"
SERVER_SHUTDOWN_TIMEOUT = 2.0


class LinkHandler(Protocol):
    """What the node plugs into a Transport: admission and the three link events."""

    def authorize(self, remote: MemberId, inbound: bool) -> bool: ...

    async def on_connect(self, link: PeerLink) -> None: ...

    async def on_message(self, link: PeerLink, payload: bytes) -> None: ...

    async def on_disconnect(self, link: PeerLink, reason: str) -> None: ...


Clock = Callable[[], float]


class Transport:
    """Peer links for one identity on one network: listen, dial, admit, score, back off."""

    def __init__(
        self,
        identity: Identity,
        network_id: bytes,
        handler: LinkHandler,
        *,
        limits: Limits = Limits(),
        clock: Clock = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not isinstance(network_id, bytes) or not 1 <= len(network_id) <= wire.MAX_NETWORK_ID:
            raise LocalError(f"A network id must be 1 to {wire.MAX_NETWORK_ID} bytes.")
        self.identity = identity
        self.network_id = network_id
        self.handler = handler
        self.limits = limits
        self.clock = clock
        self._random = random_bytes
        self.reputation = Reputation(self.limits.reputation)
        self.ip_reputation = Reputation(self.limits.reputation)
        self._links: dict[MemberId, PeerLink] = {}
        self._all: set[PeerLink] = set()
        self._admit_locks: dict[MemberId, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.handshakes = HandshakeSlots(limits.max_handshakes, limits.max_handshakes_per_range)
        # What strangers can make us log, one line per interval each.
        self._failed_log = LogLimiter(log)
        self._busy_log = LogLimiter(log)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self.address: tuple[str, int] | None = None
        # Reservations, circuits and relaying for others (node/relay.py).
        self.relaying = Relaying(self)

    @property
    def member(self) -> MemberId:
        return self.identity.member

    @property
    def links(self) -> dict[MemberId, PeerLink]:
        """The live links by remote key (a copy)."""
        return dict(self._links)

    def link(self, remote: MemberId) -> PeerLink | None:
        return self._links.get(remote)

    @property
    def may_relay(self) -> MayRelay | None:
        """Whom this node relays between (None: it serves as no relay)."""
        return self.relaying.may_relay

    @may_relay.setter
    def may_relay(self, decide: MayRelay | None) -> None:
        self.relaying.may_relay = decide

    async def reserve(self, relay_link: PeerLink) -> None:
        """Stay reachable through the relay at the other end of `relay_link` while it lives.

        Raises RelayRefusedError (with `.code`) or PeerUnreachableError."""
        await self.relaying.reserve(relay_link)

    def release(self, relay: MemberId) -> None:
        """Give up the reservation at `relay` (nothing happens if none is held there)."""
        self.relaying.release(relay)

    async def dial_via(self, relay: MemberId, target: MemberId) -> PeerLink:
        """A link to `target` through a circuit at `relay` (path "relayed", via=relay); the
        handshake runs end to end inside it. Raises RelayRefusedError, PeerUnreachableError
        or any error `connect` raises for the handshake."""
        return await self.relaying.dial_via(relay, target)

    @property
    def reservations(self) -> list[MemberId]:
        """The relays currently holding a reservation for this node."""
        return self.relaying.reservations

    def banned_for(self, key: MemberId | str) -> float:
        """Seconds this node still refuses the key or IP address (0 if it does not)."""
        rep = self.reputation if isinstance(key, MemberId) else self.ip_reputation
        return rep.banned_for(key, self.clock())

    # -- lifecycle -----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for peers on host:port (0 picks a free port); return the bound address."""
        if self._runner is not None:
            raise LocalError("The transport is already listening.")
        app = web.Application(client_max_size=4096)
        app.router.add_get(PEER_PATH, self._serve)
        # keepalive_timeout also closes a connection that has not finished a request's
        # headers in that time (a half-sent request holds nothing for long).
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SERVER_SHUTDOWN_TIMEOUT,
            keepalive_timeout=self.limits.header_timeout,
        )
        limit_accept_errors(asyncio.get_running_loop(), log)
        await runner.setup()
        # `::` means every interface of both families (IPv4 and IPv6 sockets on one port);
        # asyncio makes IPv6 listening sockets IPv6-only, so IPv4 needs a socket of its own.
        dual = host == "::"
        first = "0.0.0.0" if dual else host
        try:
            # SO_REUSEPORT lets hole-punch sockets dial from the listen port (node/punch.py);
            # the probe keeps a second daemon on this port an error, as it was without it.
            check_port_free(first, port)
            site = web.TCPSite(runner, first, port, reuse_port=True)
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise LocalError(f"Cannot listen on {host}:{port}: {e.strerror or e}.") from None
        self._runner = runner
        sock = runner.addresses[0]
        self.address = (str(sock[0]), int(sock[1]))
        if dual:
            try:
                check_port_free("::", self.address[1])
                await web.TCPSite(runner, "::", self.address[1], reuse_port=True).start()
                self.address = ("::", self.address[1])
            except OSError as e:  # a host without IPv6: IPv4 alone, as asked of 0.0.0.0
                log.warning("listening on IPv4 only: no IPv6 socket on port %d (%s)", self.address[1],
                            e.strerror or e)
        log.info("listening on %s:%d as %s", self.address[0], self.address[1], self.member)
        return self.address

    async def stop(self) -> None:
        """Close every link (handlers see on_disconnect), stop listening, end all tasks."""
        self._stopping = True
        links = list(self._all)
        for link in links:
            link.close("this node is stopping")
        if links:
            await asyncio.gather(*(lk.wait_closed() for lk in links), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- scoring -------------------------------------------------------------

    def penalize(self, remote: MemberId, points: float, reason: str, *, ip: str | None = None) -> None:
        """Lower a key's score; below the threshold its link closes and key and IP back off."""
        now = self.clock()
        banned = self.reputation.penalize(remote, points, now)
        log.info("penalised %s by %s: %s", remote.short, points, reason)
        if banned:
            self._cut_off(remote, ip, reason, banned, now)

    def ban(self, remote: MemberId, reason: str, *, ip: str | None = None) -> None:
        """Cut a key off at once and back it (and its IP) off."""
        now = self.clock()
        self._cut_off(remote, ip, reason, self.reputation.ban(remote, now), now)

    def _cut_off(self, remote: MemberId, ip: str | None, reason: str, length: float, now: float) -> None:
        if ip is not None:
            self.ip_reputation.ban(ip, now)
        log.warning("backing off %s for %.0f s: %s", remote.short, length, reason)
        for link in list(self._all):
            if link.remote == remote:
                link.close(f"{reason}; backing off for {length:.0f} s")

    # -- admission -----------------------------------------------------------

    def _forget(self, link: PeerLink) -> None:
        self._all.discard(link)
        if self._links.get(link.remote) is link:
            del self._links[link.remote]
        self.relaying.link_closed(link)

    async def _admit(self, link: PeerLink) -> PeerLink:
        """Make `link` the live link to its remote unless a better one exists; return the winner."""
        lock, users = self._admit_locks.get(link.remote, (asyncio.Lock(), 0))
        self._admit_locks[link.remote] = (lock, users + 1)
        try:
            async with lock:
                return await self._admit_locked(link)
        finally:
            lock, users = self._admit_locks[link.remote]
            if users <= 1:
                del self._admit_locks[link.remote]
            else:
                self._admit_locks[link.remote] = (lock, users - 1)

    async def _admit_locked(self, link: PeerLink) -> PeerLink:
        if link.closed:
            old = self._links.get(link.remote)
            if old is not None and not old.closed:
                return old
            raise LinkClosedError(f"The link to {link.remote.short}… closed: {link.close_reason}.")
        old = self._links.get(link.remote)
        carried: list[bytes] = []
        if old is not None and not old.closed:
            if await self._new_wins(old, link):
                if old.path == "relayed" and link.path != "relayed":
                    # What the relayed link had not yet written goes out on the direct one.
                    carried = old._take_queued()
                old.close("replaced by another connection with the same peer")
                # Wait for its on_disconnect only, not for the socket to finish closing.
                await old._notified.wait()
            else:
                link.close("duplicate connection: the peer already has a live link")
                return old
        if link.closed:
            raise LinkClosedError(f"The link to {link.remote.short}… closed: {link.close_reason}.")
        if self._stopping:
            link.close("this node is stopping")
            raise LinkClosedError("The transport is stopping.")
        self._links[link.remote] = link
        link._admitted = True
        log.info("link up %r", link)
        for payload in carried:
            link._enqueue(payload)
        link._keepalive()  # a first round trip for link.rtt
        try:
            await self.handler.on_connect(link)
        except Exception as e:
            # A link the node failed to take in would be a link it does not know about.
            log.exception("on_connect failed for %r", link)
            link.close(f"the node could not take the link in ({type(e).__name__})")
        finally:
            link._gate.set()
        return link

    async def _new_wins(self, old: PeerLink, new: PeerLink) -> bool:
        if (old.path == "relayed") != (new.path == "relayed"):
            # A path of its own beats a path through a relay, at both ends alike.
            return old.path == "relayed"
        if old.inbound == new.inbound:
            # Same dialler twice: it dialled again because it lost the old one.
            return True

        # Simultaneous dials: both ends keep the link dialled by the lower key, so
        # they agree without talking. An old link that no longer answers loses anyway,
        # so a peer that restarted is never locked out by our stale half.
        def dialler(lk: PeerLink) -> MemberId:
            return lk.remote if lk.inbound else self.member

        if dialler(new) < dialler(old):
            return True
        try:
            await old.ping(self.limits.duplicate_probe_timeout)
        except (TimeoutError, LinkClosedError):
            return True
        return False

    # -- server side ---------------------------------------------------------

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        ip = request.remote or "unknown"
        now = self.clock()
        if self._stopping:
            return web.Response(status=503, text="The node is stopping.\n")
        banned = self.ip_reputation.banned_for(ip, now)
        if banned:
            return web.Response(
                status=429,
                headers={"Retry-After": str(math.ceil(banned))},
                text="This address is backed off after misbehaviour.\n",
            )
        lim = self.limits
        if len(self._all) >= lim.max_links or self._inbound_links(ip) >= lim.max_links_per_range:
            self._busy_log.log(logging.INFO, "refused a connection from %s: no room for more links", ip)
            return web.Response(status=503, headers={"Retry-After": "5"}, text="Busy.\n")
        ws = web.WebSocketResponse(
            max_msg_size=lim.max_frame,
            compress=False,
            autoping=False,
            heartbeat=None,
            timeout=lim.close_timeout,
        )
        await ws.prepare(request)
        transport = request.transport

        def abort() -> None:
            if transport is not None:
                transport.abort()

        peer = transport.get_extra_info("peername") if transport is not None else None
        port = int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else 0
        carrier = WebSocketCarrier(ws, (ip, port), abort, lim.max_frame)
        # There is always a slot: if none is free, the stalest handshake gives up its own.
        slot = self.handshakes.take(ip, self.clock(), abort)
        link: PeerLink | None = None
        try:
            async with asyncio.timeout(lim.handshake_timeout):
                link = await self._respond(carrier, ip, slot)
        except (TimeoutError, RemoteError, ConnectionError, aiohttp.ClientError) as e:
            reason = "the handshake timed out" if isinstance(e, TimeoutError) else str(e)
            if slot.evicted:
                reason = "it made no progress and a newcomer needed its slot"
            self._failed_log.log(logging.INFO, "inbound handshake from %s failed: %s", ip, reason)
            # An evicted handshake that sent nothing is an idler (an honest peer sends HELLO
            # at once); one that was under way is not blamed: a slow honest peer looks the same.
            # A dialler that hangs up still costs something: every HELLO makes us sign.
            abandoned = not slot.messages if slot.evicted else isinstance(e, _HandshakeAbandoned)
            if abandoned:
                self.ip_reputation.penalize(ip, lim.handshake_abandon_penalty, self.clock())
            elif not slot.evicted and not isinstance(
                e, (wire.PeerRefusedError, ConnectionError, aiohttp.ClientError)
            ):
                self.ip_reputation.penalize(ip, lim.handshake_failure_penalty, self.clock())
            await self._close_raw(carrier)
        finally:
            self.handshakes.release(slot)
        if link is None:
            return ws
        run = self._spawn(link._run())
        with contextlib.suppress(LinkClosedError):
            await self._admit(link)
        await run
        return ws

    def _inbound_links(self, ip: str) -> int:
        rng = address_range(ip)
        return sum(
            1 for lk in self._all if lk.inbound and lk.ip is not None and address_range(lk.ip) == rng
        )

    async def _respond(
        self,
        carrier: Carrier,
        ip: str | None,
        slot: Slot | None,
        *,
        expect: MemberId | None = None,
        path: str = "direct",
        via: MemberId | None = None,
    ) -> PeerLink:
        """The responder's half of the handshake over `carrier`; the caller bounds its time."""
        responder = wire.Responder(self.identity, self.network_id, self._random(32))
        hello = await _recv_handshake(carrier)
        if slot is not None:
            self.handshakes.moved(slot, self.clock())
        version = wire.peek_hello_version(hello)
        if version is not None and version != wire.VERSION:
            await carrier.send(wire.encode_reject(wire.Refusal.UNSUPPORTED_VERSION))
            raise wire.VersionMismatchError(version)
        try:
            response = responder.read_hello(hello)
        except wire.NetworkMismatchError:
            await carrier.send(wire.encode_reject(wire.Refusal.NETWORK_MISMATCH))
            raise
        await carrier.send(response)
        auth = await _recv_handshake(carrier)
        if slot is not None:
            self.handshakes.moved(slot, self.clock())
        remote = responder.read_auth(auth)
        code, retry = self._admission(remote, inbound=True, ip=ip)
        if code is wire.Refusal.ACCEPTED and expect is not None and remote != expect:
            code = wire.Refusal.NOT_AUTHORISED
        verdict, channel = responder.verdict(code, retry)
        await carrier.send(verdict)
        if channel is None:
            raise wire.PeerRefusedError(code, retry)
        addr = carrier.addr or ("", 0)
        link = PeerLink(self, carrier, channel, addr, True, path=path, via=via)
        self._all.add(link)
        return link

    def _admission(
        self, remote: MemberId, *, inbound: bool, ip: str | None
    ) -> tuple[wire.Refusal, int]:
        now = self.clock()
        if remote == self.member:
            return wire.Refusal.SELF_CONNECTION, 0
        banned = self.reputation.banned_for(remote, now)
        if ip is not None:
            banned = max(banned, self.ip_reputation.banned_for(ip, now))
        if banned:
            return wire.Refusal.BACKED_OFF, math.ceil(banned)
        if self._stopping or (len(self._all) >= self.limits.max_links and remote not in self._links):
            return wire.Refusal.BUSY, 5
        if (
            inbound
            and ip is not None
            and self._inbound_links(ip) >= self.limits.max_links_per_range
            and remote not in self._links
        ):
            return wire.Refusal.BUSY, 5
        try:
            allowed = self.handler.authorize(remote, inbound)
        except Exception:
            log.exception("authorize() failed for %s", remote)
            allowed = False
        return (wire.Refusal.ACCEPTED, 0) if allowed else (wire.Refusal.NOT_AUTHORISED, 0)

    async def _close_raw(self, carrier: Carrier) -> None:
        try:
            if isinstance(carrier, WebSocketCarrier):
                await asyncio.wait_for(carrier.close_refused(), self.limits.close_timeout)
            else:
                await asyncio.wait_for(carrier.close(), self.limits.close_timeout)
        except Exception:
            carrier.abort()

    # -- client side ---------------------------------------------------------

    async def connect(self, host: str, port: int, *, expect: MemberId | None = None) -> PeerLink:
        """Dial host:port, run the handshake and return the live link to that peer.

        With `expect`, a peer presenting any other key is refused, and a live link to
        `expect` is returned at once instead of dialling again (unless it is relayed: a
        direct link replaces a relayed one). Raises
        PeerUnreachableError, wire.PeerRefusedError (NetworkMismatchError among them),
        wire.HandshakeError, AuthorizationError or BackedOffError.
        """
        if self._stopping:
            raise LocalError("The transport is stopping.")
        live = self._links.get(expect) if expect is not None else None
        if live is not None and not live.closed and live.path != "relayed":
            return live
        for key in (expect, host):
            if key is not None and self.banned_for(key):
                raise BackedOffError(f"This node backs off from {key} for a while after misbehaviour.")
        if self._session is None:
            # No connector limit: Limits.max_links bounds links, and a pool limit would
            # make the 101st dial wait silently for a link to close.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        url = URL.build(scheme="http", host=host, port=port, path=PEER_PATH)
        lim = self.limits
        ws: aiohttp.ClientWebSocketResponse | None = None
        carrier: WebSocketCarrier | None = None
        where = f"{host}:{port}"

        def abort() -> None:
            conn = getattr(getattr(ws, "_response", None), "connection", None)
            if conn is not None and conn.transport is not None:
                conn.transport.abort()

        try:
            async with asyncio.timeout(lim.connect_timeout):
                ws = await self._session.ws_connect(
                    url,
                    max_msg_size=lim.max_frame,
                    autoping=False,
                    heartbeat=None,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=lim.close_timeout),
                )
                peer = ws.get_extra_info("peername")
                ip = str(peer[0]) if isinstance(peer, tuple) and peer else host
                carrier = WebSocketCarrier(ws, (ip, port), abort, lim.max_frame)
                link = await self._initiate(carrier, where, expect)
        except TimeoutError:
            if carrier is not None:
                await self._close_raw(carrier)
            raise PeerUnreachableError(
                f"The peer at {where} did not complete the handshake within {lim.connect_timeout} s."
            ) from None
        except aiohttp.WSServerHandshakeError as e:
            raise _http_refusal(e, where) from None
        except (aiohttp.ClientError, OSError) as e:
            if carrier is not None:
                await self._close_raw(carrier)
            raise PeerUnreachableError(f"Cannot reach the peer at {where}: {e}.") from None
        except BaseException:
            if carrier is not None:
                await self._close_raw(carrier)
            raise
        self._spawn(link._run())
        return await self._admit(link)

    async def adopt_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        initiator: bool,
        expect: MemberId,
        path: str = "punched",
    ) -> PeerLink:
        """Run the handshake over an already connected byte stream and return the live link.

        For connections without a dialler, e.g. TCP simultaneous open after hole punching:
        the caller says which end initiates (both must agree) and whose key to expect.
        Messages are length-prefixed (node/carrier.py `StreamCarrier`). On any failure the
        stream is closed and the error raised, as `connect` does.
        """
        if self._stopping:
            writer.close()
            raise LocalError("The transport is stopping.")
        carrier = StreamCarrier(reader, writer, self.limits.max_frame)
        where = f"{carrier.addr[0]}:{carrier.addr[1]}" if carrier.addr else "a stream"
        return await self._adopt(carrier, where, initiator=initiator, expect=expect, path=path)

    async def _adopt(
        self,
        carrier: Carrier,
        where: str,
        *,
        initiator: bool,
        expect: MemberId,
        path: str,
        via: MemberId | None = None,
    ) -> PeerLink:
        """The handshake in a given role over a carrier made elsewhere, then admission."""
        ip = carrier.addr[0] if carrier.addr is not None and via is None else None
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                if initiator:
                    link = await self._initiate(carrier, where, expect, path=path, via=via)
                else:
                    link = await self._respond(carrier, ip, None, expect=expect, path=path, via=via)
        except TimeoutError:
            await self._close_raw(carrier)
            raise PeerUnreachableError(
                f"The peer at {where} did not complete the handshake within "
                f"{self.limits.handshake_timeout} s."
            ) from None
        except (ConnectionError, OSError) as e:
            await self._close_raw(carrier)
            raise PeerUnreachableError(f"Lost the peer at {where} during the handshake: {e}.") from None
        except BaseException:
            await self._close_raw(carrier)
            raise
        self._spawn(link._run())
        return await self._admit(link)

    async def _initiate(
        self,
        carrier: Carrier,
        where: str,
        expect: MemberId | None,
        *,
        path: str = "direct",
        via: MemberId | None = None,
    ) -> PeerLink:
        initiator = wire.Initiator(self.identity, self.network_id, self._random(32))
        await carrier.send(initiator.start())
        remote = initiator.read_response(await _recv_handshake(carrier))
        if expect is not None and remote != expect:
            raise wire.HandshakeError(
                f"The peer at {where} presents key {remote.short}…, not {expect.short}…."
            )
        ip = carrier.addr[0] if carrier.addr is not None and via is None else None
        code, retry = self._admission(remote, inbound=False, ip=ip)
        if code is wire.Refusal.NOT_AUTHORISED:
            raise AuthorizationError(f"This node does not authorise the peer {remote.short}….")
        if code is wire.Refusal.BACKED_OFF:
            raise BackedOffError(f"This node backs off from {remote.short}… for {retry} more s.")
        if code is wire.Refusal.SELF_CONNECTION:
            raise LocalError(f"The peer at {where} is this node itself.")
        if code is not wire.Refusal.ACCEPTED:
            raise LocalError("This node has no room for another link right now.")
        await carrier.send(initiator.auth())
        channel = initiator.read_verdict(await _recv_handshake(carrier))
        addr = carrier.addr or ("", 0)
        link = PeerLink(self, carrier, channel, addr, False, path=path, via=via)
        self._all.add(link)
        return link


def _http_refusal(e: aiohttp.WSServerHandshakeError, where: str) -> ValuemeshError:
    retry = 0
    if e.headers is not None:
        with contextlib.suppress(ValueError, TypeError):
            retry = int(e.headers.get("Retry-After", "0"))
    if e.status == 429:
        return wire.PeerRefusedError(wire.Refusal.BACKED_OFF, retry)
    if e.status == 503:
        return wire.PeerRefusedError(wire.Refusal.BUSY, retry)
    return PeerUnreachableError(
        f"The server at {where} is not a valuemesh peer (HTTP status {e.status})."
    )


async def _recv_handshake(carrier: Carrier) -> bytes:
    try:
        data = await carrier.receive(None)
    except CarrierViolation as e:
        raise wire.HandshakeError(f"During the handshake, {e.message}.") from None
    if data is None:
        raise _HandshakeAbandoned("The peer closed the connection during the handshake.")
    return data


class _HandshakeAbandoned(wire.HandshakeError):
    """The peer hung up mid-handshake: often an honest dialler that declined us."""
