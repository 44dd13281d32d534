"""The valuemesh daemon's node: one process that runs every constellation's engine. The
Node owns the lifecycle and wires its collaborators to the store and the peer transport.

Each collaborator owns the peer messages of its part (gossip, joining, catch-up) and
registers their handlers in the node's table; the signer signs our own records. Discovery
(bootstrap, invite addresses, peer exchange, mDNS) and the local API are wired here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import Coroutine, Iterable, Sequence
from importlib.metadata import entry_points, version
from typing import Any

from aiohttp import web

from valuemesh.node import portmap, trace, views
from valuemesh.node.addresses import Address, ExchangeEntry, Source, parse_hostport
from valuemesh.node.addrspread import AddressSpread
from valuemesh.node.api import make_app
from valuemesh.node.budgets import Budgets
from valuemesh.node.catchup import CHECKPOINT_START_MIN_RECORDS, Catchup
from valuemesh.node.clock import now_ms
from valuemesh.node.dialback import DialBack, plain_ip
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.gossip import Gossip
from valuemesh.node.held import Held, open_home_store
from valuemesh.node.home import Home
from valuemesh.node.joining import Joining
from valuemesh.node.jsonbody import body_from_json
from valuemesh.node.link import PeerLink
from valuemesh.node.link_limits import HEADER_TIMEOUT
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, NotYetKnown, send
from valuemesh.node.netview import NetView
from valuemesh.node.peer_manager import PeerManager
from valuemesh.node.peers import PeerTable
from valuemesh.node.reach import Reach
from valuemesh.node.seqcheck import SeqCheck
from valuemesh.node.signer import Signer
from valuemesh.node.store import PeerInfo, Store
from valuemesh.node.transport import Transport
from valuemesh.node.verify import ParallelVerifier
from valuemesh.protocol import messages as m
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.errors import LocalError, NotFoundError, PluginError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.plugins import ENTRY_POINT_GROUP, Registry, load_entry_points
from valuemesh.protocol.records import Record, constellation_text, decode_record, parse_constellation

log = logging.getLogger("valuemesh.daemon")
TICK_S = 0.005  # the shortest sleep of the tick loop
RESUBMIT_S = 2.0
IDLE_WAKE_S = 1.0
STOP_SETTLE_S = 5.0  # how long a stopping node waits for epoch ends still being stored
MAX_API_IDS = 256  # constellation id texts remembered by engine_for


def installed_registry(disabled: Iterable[str] = ()) -> Registry:
    """Every plugin installed in this Python environment (entry-point group), minus those the
    operator switched off (setting `disable_plugins`; a node without them refuses constellations
    that use them)."""
    off = frozenset(disabled)
    if "membership" in off:
        # Without it no genesis applies, so every constellation would fail in a confusing way.
        raise PluginError("The membership plugin cannot be disabled; every constellation needs it.")
    return load_entry_points(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in off)


class Node:
    """The daemon's node: its lifecycle, and the wiring of the store, the transport, the
    handler table and the collaborators; also what the local API asks of the node."""

    # Wired in start(), once the store and the transport exist.
    store: Store
    transport: Transport
    gossip: Gossip
    catchup: Catchup
    joining: Joining
    signer: Signer
    held: Held
    addrs: AddressSpread
    dialback: DialBack
    reach: Reach
    netview: NetView  # paths and netcheck (node/netview.py)

    def __init__(
        self,
        home: Home,
        identity: Identity,
        *,
        listen: str,
        api: str,
        network: str,
        bootstrap: Sequence[str] = (),
        mdns: bool = False,
        mdns_interfaces: Sequence[str] = (),
        registry: Registry | None = None,
        checkpoint_start_min_records: int = CHECKPOINT_START_MIN_RECORDS,
        retain_epochs: int | None = None,
        verify_threads: int | None = None,
        name: str = "",
        recover: bool = False,
        serve_relay: bool = True,
        port_mapping: bool = False,
    ) -> None:
        self.home = home
        self.serve_relay = serve_relay  # relay for other members (node/relay.py)
        # Start even if the database holds less than the home remembers (node/held.py).
        self.recover = recover
        self.name = name  # what other members see when this node joins
        # Received blocks' and records' signatures, checked on up to this many cores at once.
        self.verifier = ParallelVerifier(verify_threads)
        self.checkpoint_start_min_records = checkpoint_start_min_records
        if retain_epochs is not None and retain_epochs < 1:
            raise LocalError("retain_epochs must be 1 or more (or absent: keep every block).")
        self.retain_epochs = retain_epochs
        self.identity = identity
        self.listen_host, self.listen_port = parse_hostport(listen, default_host="::")
        self.api_host, self.api_port = parse_hostport(api, default_host="127.0.0.1")
        if self.api_host not in ("127.0.0.1", "::1", "localhost"):
            raise LocalError("The local API must listen on loopback (127.0.0.1 or ::1).")
        self.network = network
        self.network_id = network.encode()
        self.registry = registry if registry is not None else installed_registry()
        self.engines: dict[bytes, Engine] = {}
        self.links: dict[MemberId, PeerLink] = {}
        self.peer_constellations: dict[MemberId, set[bytes]] = {}
        for b in bootstrap:
            parse_hostport(b)  # a mistyped address is the operator's error, at once
        self.bootstrap = list(bootstrap)
        self.table = PeerTable(identity.member, random.Random(secrets.randbits(64)), now=time.monotonic())
        self.peers: PeerManager | None = None
        self.mdns = mdns
        self.mdns_interfaces = list(mdns_interfaces)
        self.discovery: Any = None
        self.handlers = Handlers()
        self._opened = False
        self._runner: web.AppRunner | None = None
        self._saved_shape: tuple[object, ...] = ()  # what _save_peers last wrote, by identity
        self._told: dict[MemberId, frozenset[tuple[MemberId, Any]]] = {}  # the last offer per linked key
        self._tasks: list[asyncio.Task[None]] = []
        # -- port mapping (node/portmap.py): asked for in the background once listening.
        self.port_mapping = port_mapping
        self.portmap: portmap.PortMapper | None = None
        self._background: set[asyncio.Task[None]] = set()
        # API constellation id text -> engine, for texts that parsed to a followed constellation.
        self._by_text: dict[str, Engine] = {}
        self._wake = asyncio.Event()
        self.started_at = time.time()
        self.budgets = Budgets()  # what a peer's data may cost this node (node/budgets.py)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        trace.start(self.identity.member.key.hex()[:8])
        self.store, self.held = await open_home_store(self.home, self.identity.member, recover=self.recover)
        self._opened = True
        for info in await self.store.constellations():
            try:
                eng = self._new_engine(decode_record(info.genesis))
                await eng.load()
            except (PluginError, LocalError) as exc:
                log.error("cannot follow constellation %s: %s", constellation_text(info.id), exc.message)
                continue
            self.engines[eng.cid] = eng
        now = time.monotonic()
        wall = now_ms()
        for p in await self.store.peers():
            with contextlib.suppress(ValuemeshError, ValueError):
                self.table.restore(p.member, Address(p.host, p.port), Source(p.source),
                                   max(0.0, (wall - p.last_seen) / 1000), now, reached=p.failures == 0)
        self.transport = Transport(self.identity, self.network_id, self)
        # -- relaying for other members (node/relay.py): only between members of a
        # constellation this node is in; reserving and dialling via relays is node/reach.py's.
        if self.serve_relay:
            self.transport.may_relay = self.may_relay
        self._wire()
        self.listen_host, self.listen_port = await self.transport.start(self.listen_host, self.listen_port)
        self.reach.start((self.listen_host, self.listen_port))
        self.peers = PeerManager(self.table, self.transport, rng=random.Random(secrets.randbits(64)),
                                 groups=self.shared_with)
        await self._start_addresses(self.peers)
        self.peers.add_bootstrap(self.bootstrap)
        self.peers.start()
        token = self.home.new_api_token()
        # A connection that has not sent a whole request's headers in time is closed.
        self._runner = web.AppRunner(make_app(self, token), access_log=None, keepalive_timeout=HEADER_TIMEOUT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.api_host, self.api_port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.api_port = server.sockets[0].getsockname()[1]
        self.home.write_api_address(self.api_host, self.api_port, os.getpid())
        if self.mdns:
            await self._start_mdns()
        self._tasks = [asyncio.create_task(self._tick_loop())]
        if self.port_mapping:  # -- port mapping: the node does not wait for the router
            self.portmap = portmap.PortMapper(self.listen_port, listen_host=self.listen_host)
            self.portmap.on_change(self.reach.mapped)
            self.reach.expect_mapping()
            self._tasks.append(asyncio.create_task(self._start_portmap()))
        log.info("started member=%s listen=%s:%d api=%s:%d constellations=%d", self.identity.member,
                 self.listen_host, self.listen_port, self.api_host, self.api_port, len(self.engines))

    def _wire(self) -> None:
        """Build the collaborators around the open store and register their message handlers
        (before the transport listens: no message arrives before its handler)."""
        self.gossip = Gossip(self.store, self.engines, self.links, send=send, verifier=self.verifier,
                             spawn=self._spawn, wake=self._wake, fetching=lambda cid: self.catchup.fetching(cid),
                             budgets=self.budgets)
        self.catchup = Catchup(self.store, self.engines, self.links, send=self._send_private, spawn=self._spawn,
                               hello=self._hello, send_heads=self.gossip.send_heads, effects=self.gossip.effects,
                               start_min_records=self.checkpoint_start_min_records, history=self.gossip.gates.history)
        self.joining = Joining(self.identity, self.store, self.engines, self.links, send=send, spawn=self._spawn,
                               connect=self.transport.connect, new_engine=self._new_engine,
                               forward=self.gossip.forward, first_sync=self.catchup.first_sync,
                               reached=self._inviter_reached, gates=self.gossip.gates)
        self.seqcheck = SeqCheck(self.identity, self.store, self.engines, self.links, send=send,
                                 doubt=self.held.doubt)
        self.signer = Signer(self.identity, self.registry, self.store, self.engines, spawn=self._spawn,
                             effects=self.gossip.effects, forward=self.gossip.forward, held=self.held,
                             waiting=self.seqcheck.waiting)
        self.handlers.add(m.Hello, self._on_hello)
        self.handlers.add(m.PeerExchange, self._on_peer_exchange)
        for part in (self.gossip, self.catchup, self.joining, self.seqcheck):
            part.register(self.handlers)
        self._wire_addresses()

    def _new_engine(self, genesis: Record) -> Engine:
        eng = Engine(self.store, self.registry, self.identity, genesis)
        eng.retain_epochs = self.retain_epochs
        return eng

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` in its own task, cancelled when the node stops."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _hello(self, to: MemberId | None = None) -> m.Hello:
        """What we tell a peer of ourselves: only the constellations it is a member of, so a
        stranger learns no constellation id (a joiner names its own, in its token)."""
        return m.Hello(self.shared_with(to) if to is not None else [], self.listen_port, version("valuemesh"))

    def shared_with(self, key: MemberId) -> list[bytes]:
        """The constellations `key` may receive data of (members, applicants, those who left)."""
        return sorted(cid for cid, eng in self.engines.items() if eng.may_receive(key))

    async def _send_private(self, link: PeerLink, msg: m.Message) -> None:
        # Whoever sends a Hello, the receiving key hears only of what it shares with us.
        await send(link, self._hello(link.remote) if isinstance(msg, m.Hello) else msg)

    async def _start_portmap(self) -> None:
        assert self.portmap is not None
        await self.portmap.start()

    async def _start_mdns(self) -> None:
        from valuemesh.node.discovery import Discovery
        self.discovery = Discovery(
            member=self.identity.member, network_id=self.network_id, port=self.listen_port,
            interfaces=self.mdns_interfaces or None, on_found=self._on_mdns_found,
        )
        await self.discovery.start()

    def _on_mdns_found(self, found: Any) -> None:
        if self.peers is not None:
            self.peers.found(found)

    async def stop(self) -> None:
        for eng in self.engines.values():  # an epoch end being stored is finished, not cut off
            with contextlib.suppress(asyncio.TimeoutError, ValuemeshError):
                await asyncio.wait_for(eng.settle(), STOP_SETTLE_S)
        # The tick loop, gap streams, the signer's drain, first syncs and skips ahead.
        tasks = [*self._tasks, *self._background]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.stop()
        if self.portmap is not None:  # -- port mapping: deleted at the router on a clean stop
            await self.portmap.stop()
        if self.peers is not None:
            await self.peers.stop()
        if hasattr(self, "dialback"):
            await self.dialback.close()
            self.reach.close()
        if hasattr(self, "transport"):  # start may have failed before it
            await self.transport.stop()
        if self._opened:
            await self._save_peers()
        if self._runner is not None:
            await self._runner.cleanup()
        self.home.clear_api_address()
        if self._opened:
            # Constellations joined since start enter the home's record here at the latest.
            with contextlib.suppress(ValuemeshError):
                for cid in list(self.engines):
                    self.held.raise_to(cid, await self.store.next_seq(cid, self.identity.member))
            await self.store.close()
            if self.held.dirty:  # the signer's last floors, if its write was cut off
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self.held.save)
        self.verifier.close()
        trace.stop()
        log.info("stopped")

    # -- loops -----------------------------------------------------------------
    async def _tick_loop(self) -> None:
        """Tick each engine when its consensus asked to be ticked, and sleep otherwise:
        an idle node wakes once a second at most (to re-hand pending records)."""
        last_forward = 0.0
        while True:
            due = [e.next_tick for e in self.engines.values() if e.next_tick is not None]
            wait = IDLE_WAKE_S if not due else (min(due) - now_ms()) / 1000
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(max(wait, TICK_S), IDLE_WAKE_S))
            else:
                # A step due now may finish without awaiting anything (an engine still loading
                # answers at once): yield anyway, or this loop would starve everything else.
                await asyncio.sleep(0)
            self._wake.clear()
            now = now_ms()
            forward = time.monotonic() - last_forward >= RESUBMIT_S
            if forward:
                last_forward = time.monotonic()
            for eng in list(self.engines.values()):
                try:
                    if eng.next_tick is not None and eng.next_tick <= now:
                        if trace.tracer is not None:
                            trace.tracer.event("tick", due=eng.next_tick, now=now)
                        await self.gossip.effects(eng, await eng.tick(now))
                    if forward and eng.pending and not eng.is_core():
                        # Until our records are final, keep handing them to core
                        # members: a link may have dropped, or a core node restarted.
                        await self.gossip.forward(eng, list(eng.pending.values()))
                    if forward:
                        self.catchup.check_stuck(eng, time.monotonic())
                    if eng.checkpoints_out:  # signed in the background since the last step
                        await self.gossip.effects(eng, Effects())
                except ValuemeshError as exc:
                    log.warning("tick failed for %s: %s", eng.text_id, exc.message)
                except Exception:  # never let one engine's fault stop the loop for all
                    log.exception("tick failed for %s", eng.text_id)
            if forward:
                await self.seqcheck.tick()
                await self._addresses_beat()
                for link in list(self.links.values()):
                    await self._offer_peers(link)
                try:
                    await self._save_peers(only_if_changed=True)
                except ValuemeshError as exc:
                    log.warning("could not save the peer list: %s", exc.message)

    async def _save_peers(self, *, only_if_changed: bool = False) -> None:
        """Write the addresses worth keeping (AddressBook.saved) to the store. The tick loop
        calls it every RESUBMIT_S with `only_if_changed`: a new or newly proven address is on
        disk within seconds, so a node killed -9 finds its peers again without a bootstrap."""
        now, wall = time.monotonic(), now_ms()
        saved = self.table.saved(now)
        shape = tuple((a.member, a.address, a.source, a.reached) for a in saved)
        if not saved or (only_if_changed and shape == self._saved_shape):
            return
        self._saved_shape = shape
        async with self.store.batch() as tx:
            for a in saved:
                tx.put_peer(PeerInfo(a.member, a.address.host, a.address.port, str(a.source),
                                     wall - int(a.age * 1000), 0 if a.reached else max(1, a.dial_failures)))

    def may_relay(self, src: MemberId, dst: MemberId) -> bool:
        """Whether this node relays a circuit from `src` to `dst` (for a reservation both are
        the reserving member): both active members of a constellation this node takes part in."""
        return any(
            eng.taking_part()
            and eng.ledger.member_status(src.key) == "active"
            and eng.ledger.member_status(dst.key) == "active"
            for eng in self.engines.values()
        )

    # -- transport handler ---------------------------------------------------------
    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        # Anyone on our network may connect (an invitee must reach us to join);
        # constellation data is only ever sent to its members (see may_receive).
        return remote != self.identity.member

    async def on_connect(self, link: PeerLink) -> None:
        self.links[link.remote] = link
        await send(link, self._hello(link.remote))
        await self._links_changed()
        await self.addrs.link_up(link)
        self.reach.link_up(link)
        await self._offer_peers(link)

    async def _offer_peers(self, link: PeerLink) -> None:
        """Tell `link`'s member the addresses of the members we share with it, when what we
        would tell differs from what we told it last: at link-up, and on the tick loop's
        RESUBMIT_S beat, so a joiner hears of the others once its join is final, and the
        others of it, with nothing sent while nothing changes."""
        if self.peers is None:
            return
        offer = self.peers.exchange_offer(link.remote)[: m.MAX_PEERS_PER_EXCHANGE]
        told = frozenset((e.member, e.address) for e in offer)
        if not offer or self._told.get(link.remote) == told:
            return
        self._told[link.remote] = told
        await send(link, m.PeerExchange([[e.member.key, e.address.host, e.address.port, int(e.age)] for e in offer]))

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        if self.links.get(link.remote) is link:
            del self.links[link.remote]
            self.peer_constellations.pop(link.remote, None)
            self._told.pop(link.remote, None)
        self.addrs.link_down(link)
        self.reach.link_down(link)
        if self.peers is not None:
            self.peers.link_down(link)
        await self._links_changed()

    async def _links_changed(self) -> None:
        """Tell each constellation's consensus which core members we cannot reach, so it does
        not wait for their anchor blocks (a killed member costs no anchor wait)."""
        for eng in list(self.engines.values()):
            down = {mid for mid, _ in eng.current_committee().members
                    if mid != self.identity.member and mid not in self.links}
            if down != eng.unreachable:
                with contextlib.suppress(ValuemeshError):
                    await self.gossip.effects(eng, await eng.set_unreachable(down, now_ms()))

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        if self.peers is not None:
            self.peers.heard_from(link.remote)
        try:
            msg = m.decode_message(payload)
            await self.handlers.dispatch(link, msg)
        except RemoteError as exc:
            log.info("bad data from %s: %s", link.remote.short, exc.message)
            link.penalize(PENALTY_INVALID, exc.message)
        except NotYetKnown as exc:
            log.debug("ignored: %s", exc.message)
        except ValuemeshError as exc:
            log.warning("could not handle a message from %s: %s", link.remote.short, exc.message)
        except Exception:
            log.exception("internal error while handling a message from %s", link.remote.short)

    async def _on_hello(self, link: PeerLink, msg: m.Hello) -> None:
        self.peer_constellations[link.remote] = set(msg.constellations)
        if self.peers is not None:
            self.peers.link_up(link, listen_port=msg.listen_port or None)
        for cid in msg.constellations:
            eng = self.engines.get(cid)
            # Only a member asks to sync (a read-only imported copy would be refused).
            if eng is not None and eng.may_receive(link.remote) and eng.taking_part():
                await self.gossip.send_heads(link, eng)

    async def _on_peer_exchange(self, link: PeerLink, msg: m.PeerExchange) -> None:
        if self.peers is not None:
            try:
                entries = [ExchangeEntry(MemberId(k), Address(h, p), float(age)) for k, h, p, age in msg.peers]
            except ValuemeshError as exc:
                raise RemoteError(f"A peer-exchange entry is invalid: {exc.message}") from None
            self.peers.exchange_received(link, entries)

    def _inviter_reached(self, link: PeerLink, host: str, port: int) -> None:
        if self.peers is not None:
            self.peers.add_known(link.remote, Address(host, port), Source.INVITE)
            # Linked now, not at the inviter's hello: else the table dials the address just
            # added once more, and that link replaces the one carrying the join and its
            # checkpoint request (whose answer was then awaited 10 s in vain).
            if not link.closed:
                self.peers.link_up(link)

    # -- address records and dial-back (node/addrspread.py, node/dialback.py) -------
    def _wire_addresses(self) -> None:
        self.addrs = AddressSpread(
            self.identity, self.store, self.links, send=send, groups=self.shared_with, feed=self._feed_record,
            penalize=lambda k, points, why: self.transport.penalize(k, points, why),
            listen=lambda: (self.listen_host, self.listen_port))
        self.addrs.register(self.handlers)
        self.dialback = DialBack(self.identity, self.network_id, self.links, send=send, groups=self.shared_with,
                                 addresses=self.addrs.to_check, on_result=self.addrs.set_reach, spawn=self._spawn)
        self.dialback.register(self.handlers)
        self.addrs.observed = lambda: [h for a in self.dialback.state.observed.values()
                                       if (h := plain_ip(a.host)) is not None]
        self.reach = Reach(self.identity.member, self.transport, self.links, self.addrs, self.dialback, send=send,
                           wanted=self._core_members, groups=self.shared_with, spawn=self._spawn)
        self.reach.register(self.handlers)
        self.netview = NetView(transport=self.transport, addrs=self.addrs, dialback=self.dialback,
                               ask=self._ask_dialback, spawn=self._spawn, mapper=lambda: self.portmap,
                               path=self.reach.path,
                               listen=lambda: (self.listen_host, self.listen_port),
                               port_mapping=self.port_mapping, serve_relay=self.serve_relay)

    def _core_members(self) -> set[MemberId]:
        """Whom this node keeps linked to, through a relay if need be: the core members of
        every constellation it takes part in (their blocks make our records final)."""
        return {mid for eng in self.engines.values() if eng.taking_part()
                for mid, _ in eng.current_committee().members} - {self.identity.member}

    async def _addresses_beat(self) -> None:
        await self.addrs.beat()
        await self.reach.beat()
        if self.dialback.due():
            self._spawn(self._ask_dialback())

    async def _ask_dialback(self) -> None:
        await self.dialback.ask()
        await self.addrs.refresh_own()

    async def _start_addresses(self, peers: PeerManager) -> None:
        peers.signed = self.addrs.has_record
        peers.on_misclaim = self.addrs.misclaimed
        peers.on_dial_failed = self.reach.dial_failed
        await self.addrs.load()  # before any dial: a restarted node dials its peers' last records
        await self.addrs.refresh_own()

    def _feed_record(self, member: MemberId, addresses: Sequence[Address]) -> None:
        if self.peers is not None:
            self.peers.set_record(member, addresses)
        else:
            self.table.set_record(member, addresses, time.monotonic())

    # -- API services --------------------------------------------------------------
    def engine_for(self, text: str) -> Engine:
        hit = self._by_text.get(text)
        if hit is not None and self.engines.get(hit.cid) is hit:
            return hit  # parsing the text (base32 and checksum) cost more than the rest of a status call
        cid = parse_constellation(text)
        eng = self.engines.get(cid)
        if eng is None:
            raise NotFoundError(f"This node does not follow constellation {text}.")
        if len(self._by_text) >= MAX_API_IDS:
            self._by_text.clear()
        self._by_text[text] = eng
        return eng

    def _own_address(self) -> tuple[str, int]:
        host = self.listen_host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.listen_port

    def addresses(self) -> list[str]:
        return [str(Address(*self._own_address()))]

    def id_info(self) -> dict[str, Any]:
        return {"member": str(self.identity.member), "running": True, "addresses": self.addresses(),
                "version": version("valuemesh"), "network": self.network,
                "plugins": {n: str(p.version) for n, p in self.registry.plugins.items()}}

    def peer_list(self) -> list[dict[str, Any]]:
        """Every known peer: liveness state, how it is reached, shared constellations."""
        out = []
        for v in self.table.snapshot(time.monotonic()):
            doc = v.to_json()
            mid = MemberId.parse(v.member)
            link = self.links.get(mid)
            doc["address"] = f"{link.addr[0]}:{link.addr[1]}" if link else (
                f"{v.addresses[0].host}:{v.addresses[0].port}" if v.addresses else "")
            doc["via"] = v.via.source if v.via is not None else (v.addresses[0].source if v.addresses else "")
            doc["connected"] = link is not None
            doc.update(self.netview.link_json(link))  # path, relay, rtt_ms
            doc["constellations"] = [constellation_text(c) for c in sorted(self.peer_constellations.get(mid, ()))]
            out.append(doc)
        return out

    def status(self) -> dict[str, Any]:
        """Health says *degraded* and why while any active constellation's records cannot
        become final from here now (views.reach: too little of the core linked)."""
        cons, short = [], []
        linked = set(self.links)
        for e in self.engines.values():
            c = views.summary(e)
            c["reach"] = views.reach(e.current_committee(), self.identity.member, linked)
            if c["status"] == "active" and c["my_tier"] != "applicant" and not c["reach"]["enough"]:
                short.append(f"{c['name'] or c['id'][:16]}: {c['reach']['text']}")
            cons.append(c)
        health = "degraded: " + "; ".join(short) if short else "ok"
        return {"health": health, "member": str(self.identity.member), "listen": self.addresses()[0],
                "uptime_s": int(time.time() - self.started_at), "peers": self.peer_list(), "constellations": cons}

    async def netcheck(self, fresh: bool, wait_s: float) -> dict[str, Any]:
        return await self.netview.netcheck(fresh, wait_s)

    def constellation_list(self) -> list[dict[str, Any]]:
        return [{k: s[k] for k in ("id", "name", "members", "status", "my_tier", "guarantee")}
                for s in (views.summary(e) for e in self.engines.values())]

    async def add_peer(self, address: str) -> dict[str, Any]:
        host, port = parse_hostport(address)
        if self.peers is not None:
            self.peers.add_bootstrap([address])
        return {"address": f"{host}:{port}"}

    async def create_constellation(self, name: str, purpose: str) -> dict[str, Any]:
        if len(name) > 128 or len(purpose) > 1000:
            raise LocalError("The name must be at most 128 characters and the purpose at most 1000.")
        plugins = {n: str(p.version) for n, p in self.registry.plugins.items()}
        genesis = make_genesis(self.identity, name=name, purpose=purpose, nonce=secrets.token_bytes(16),
                               created=now_ms(), plugins=plugins)
        await self.store.reserve_seq(genesis.constellation, self.identity.member)
        eng = self._new_engine(genesis)
        await eng.register(now_ms())
        self.engines[eng.cid] = eng
        self.signer.remember(eng.cid, genesis.seq + 1)
        return views.summary(eng)

    async def invite(self, cid: bytes, doc: dict[str, Any]) -> dict[str, Any]:
        eng = self.engines[cid]
        roles, tier = doc.get("roles", []), doc.get("tier", "contributor")
        uses, ttl = doc.get("uses", 1), doc.get("ttl_s", 7 * 86400)
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise LocalError("Roles must be a list of role names.")
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= 10_000:
            raise LocalError("The use limit must be a whole number from 1 to 10000.")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 60 <= ttl <= 365 * 86400:
            raise LocalError("The time to live must be between 1 minute and 1 year.")
        if eng.my_tier() != "core":
            raise LocalError("Only core members can invite.")
        inv = Invite.create(self.identity, constellation=cid, name=eng.name, tier=str(tier), roles=tuple(roles),
                            uses=uses, expires=now_ms() + ttl * 1000, addrs=self._invite_addrs(eng),
                            nonce=secrets.token_bytes(16))
        return {"token": inv.text(), "expires": inv.expires, "tier": inv.tier, "roles": list(inv.roles),
                "uses": inv.uses}

    def _invite_addrs(self, eng: Engine) -> tuple[tuple[str, int], ...]:
        """Where a joiner may reach the group: our record's addresses (public ones first;
        never 127.0.0.1 for a node listening on every interface, unless it has nothing
        else), then the proven addresses of the members we are linked to."""
        rec = self.addrs.own()
        mine = sorted(rec.addresses, key=lambda a: a.kind.value == "lan") if rec is not None else []
        out = [(a.host, a.port) for a in mine] or [self._own_address()]
        for v in self.table.snapshot(time.monotonic()):
            if v.linked and v.via is not None and eng.may_receive(MemberId.parse(v.member)):
                out.extend((a.host, a.port) for a in v.addresses if a.ok_ago is not None)
        return tuple(dict.fromkeys(out))[:8]

    async def join(self, token: str) -> dict[str, Any]:
        return await self.joining.join(token, name=self.name)

    async def submit_json(self, cid: bytes, rtype: str, body: Any) -> dict[str, Any]:
        return (await self.submit_json_many(cid, [(rtype, body)]))[0]

    async def submit_json_many(self, cid: bytes, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Check every record first (all or nothing), then sign and store them at once."""
        eng = self.engines[cid]
        used = eng.ledger.reader.read("membership", "meta")["plugins"]
        bodies = []
        for rtype, body in items:
            plugin = self.registry.plugins.get(rtype)
            if plugin is None or rtype not in used:
                raise LocalError(f"This constellation does not use record type '{rtype}'.")
            bodies.append((rtype, body_from_json(plugin, body)))
        return await self.submit_many(eng, bodies)

    async def submit(self, eng: Engine, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.signer.submit(eng, rtype, body)

    async def submit_many(self, eng: Engine, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return await self.signer.submit_many(eng, items)
