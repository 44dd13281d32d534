"""The valuemesh daemon: one process that runs every constellation's engine
and wires the store, the encrypted peer transport, gossip and catch-up,
discovery (bootstrap, invite addresses, peer exchange, mDNS) and the local API.

Gossip is push-first: a node's new blocks go to every connected member at once;
on connect, peers exchange per-author heads and stream each other's gaps in
batches; missing parents are fetched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points, version
from typing import Any

from aiohttp import web

from valuemesh.node import trace, views
from valuemesh.node.api import make_app
from valuemesh.node.discovery import PeerManager
from valuemesh.node.discovery import parse_hostport as parse_peer_address
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.home import Home
from valuemesh.node.jsonbody import body_from_json
from valuemesh.node.peers import Address, ExchangeEntry, PeerTable, Source
from valuemesh.node.store import Checkpoint as StoredCheckpoint
from valuemesh.node.store import PeerInfo, Store, StoredBlock
from valuemesh.node.transport import PeerLink, Transport
from valuemesh.node.verify import ParallelVerifier
from valuemesh.protocol import cbor
from valuemesh.protocol import messages as m
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.consensus import (
    Checkpoint,
    CheckpointCertificate,
    decode_committee,
    encode_committee,
    verify_chain,
)
from valuemesh.protocol.errors import LocalError, NotFoundError, PluginError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.invite import Invite, decode_invite, parse_token
from valuemesh.protocol.plugins import ENTRY_POINT_GROUP, Registry, load_entry_points
from valuemesh.protocol.records import (
    EquivocationProof,
    Record,
    constellation_text,
    decode_blocks,
    decode_record,
    decode_records,
    parse_constellation,
)
from valuemesh.protocol.snapshot import Snapshot

log = logging.getLogger("valuemesh.daemon")
TICK_S = 0.005  # the shortest sleep of the tick loop
RESUBMIT_S = 2.0
PROGRESS_LOG_S = 2.0
IDLE_WAKE_S = 1.0
DIAL_INTERVAL_S = 1.0
JOIN_TIMEOUT_S = 15.0
# A newcomer starts from the latest certified checkpoint (docs/consensus.md §7) instead of
# replaying every block since genesis when the checkpoint covers at least this many final
# records (config key `checkpoint_start_min_records`; below it, the whole history is cheap).
CHECKPOINT_START_MIN_RECORDS = 10_000
CHECKPOINT_TIMEOUT_S = 10.0  # for the chain and for each snapshot part
# A node holding blocks this many epochs ahead of its own that orders nothing for this long
# is stuck behind blocks its peers pruned: it skips ahead to a checkpoint.
SKIP_AHEAD_EPOCHS = 2
SKIP_AHEAD_STALL_S = 5.0
STOP_SETTLE_S = 5.0  # how long a stopping node waits for epoch ends still being stored
SYNC_BATCH = 128
MAX_API_IDS = 256  # constellation id texts remembered by engine_for
# Bytes of blocks per Blocks message: well inside a message's limit (m.MAX_MESSAGE_SIZE), so
# a batch of large blocks is split rather than refused; one block always goes alone.
SYNC_BATCH_BYTES = 2 * 1024 * 1024
MAX_DIAL_ADDRS = 64
PENALTY_INVALID = 20


DISABLE_PLUGINS_ENV = "VALUEMESH_DISABLE_PLUGINS"


def disabled_plugins() -> frozenset[str]:
    """Plugin names the operator switched off with VALUEMESH_DISABLE_PLUGINS=name1,name2."""
    names = frozenset(n.strip() for n in os.environ.get(DISABLE_PLUGINS_ENV, "").split(",") if n.strip())
    if "membership" in names:
        # Without it no genesis applies, so every constellation would fail in a confusing way.
        raise PluginError("The membership plugin cannot be disabled; every constellation needs it.")
    return names


def installed_registry() -> Registry:
    """Every plugin installed in this Python environment (entry-point group), minus
    those switched off by the operator (a node without them refuses constellations that use them)."""
    off = disabled_plugins()
    return load_entry_points(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in off)


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_hostport(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    t = text.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = t.rpartition(":")
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise LocalError(f"'{text}' is not an address; use HOST:PORT, like 127.0.0.1:7470.")
    return host or default_host, int(port_s)


class Node:
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
    ) -> None:
        self.home = home
        # Received blocks' and records' signatures, checked on up to this many cores at once.
        self.verifier = ParallelVerifier(verify_threads)
        self.checkpoint_start_min_records = checkpoint_start_min_records
        if retain_epochs is not None and retain_epochs < 1:
            raise LocalError("retain_epochs must be 1 or more (or absent: keep every block).")
        self.retain_epochs = retain_epochs
        self.identity = identity
        self.listen_host, self.listen_port = parse_hostport(listen)
        self.api_host, self.api_port = parse_hostport(api, "127.0.0.1")
        if self.api_host not in ("127.0.0.1", "::1", "localhost"):
            raise LocalError("The local API must listen on loopback (127.0.0.1 or ::1).")
        self.network = network
        self.network_id = network.encode()
        self.registry = registry if registry is not None else installed_registry()
        self.engines: dict[bytes, Engine] = {}
        self.links: dict[MemberId, PeerLink] = {}
        self.peer_constellations: dict[MemberId, set[bytes]] = {}
        for b in bootstrap:
            parse_peer_address(b)  # a mistyped address is the operator's error, at once
        self.bootstrap = list(bootstrap)
        self.table = PeerTable(identity.member, random.Random(secrets.randbits(64)), now=time.monotonic())
        self.peers: PeerManager | None = None
        self.mdns = mdns
        self.mdns_interfaces = list(mdns_interfaces)
        self.store: Store | None = None
        self.transport: Transport | None = None
        self.discovery: Any = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._join_waiters: dict[bytes, asyncio.Future[Record]] = {}
        self._join_links: dict[bytes, PeerLink] = {}
        self._join_asked: dict[bytes, PeerLink] = {}  # the member each pending join was sent to
        # A newcomer's pending checkpoint start: the link asked, and where its answers go.
        self._chain_waiters: dict[bytes, tuple[PeerLink, asyncio.Future[m.CheckpointChain]]] = {}
        self._snapshot_parts: dict[bytes, tuple[PeerLink, asyncio.Queue[m.SnapshotPart]]] = {}
        self._stuck: dict[bytes, tuple[float, int]] = {}  # since when an engine far behind made no progress
        self._background: set[asyncio.Task[None]] = set()
        self._last_progress_log = 0.0
        self._sign_lock = asyncio.Lock()
        self._submit_queue: list[_SubmitJob] = []
        self._submitter: asyncio.Task[None] | None = None
        # Per constellation: the engine and the seq after the last record of ours that
        # _sign_and_store stored durably. Only this process signs our records (the store
        # is locked to it) and, while an engine exists, only _sign_and_store does, so the
        # store is read once per engine rather than once per group of requests (a query on
        # the reader's thread, two thread hops, per group).
        self._own_next: dict[bytes, tuple[Engine, int]] = {}
        # API constellation id text -> engine, for texts that parsed to a followed constellation.
        self._by_text: dict[str, Engine] = {}
        self._wake = asyncio.Event()
        self._streams: dict[tuple[MemberId, bytes], asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        trace.start(self.identity.member.key.hex()[:8])
        self.store = await Store.open(self.home.db_file)
        for info in await self.store.constellations():
            try:
                genesis = decode_record(info.genesis)
                eng = Engine(self.store, self.registry, self.identity, genesis)
                eng.retain_epochs = self.retain_epochs
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
        self.listen_host, self.listen_port = await self.transport.start(self.listen_host, self.listen_port)
        self.peers = PeerManager(self.table, self.transport, rng=random.Random(secrets.randbits(64)))
        self.peers.add_bootstrap(self.bootstrap)
        self.peers.start()
        token = self.home.new_api_token()
        self._runner = web.AppRunner(make_app(self, token), access_log=None)
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
        log.info("started member=%s listen=%s:%d api=%s:%d constellations=%d", self.identity.member,
                 self.listen_host, self.listen_port, self.api_host, self.api_port, len(self.engines))

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
        self._stopping.set()
        if self._submitter is not None:
            self._tasks.append(self._submitter)
        for eng in self.engines.values():  # an epoch end being stored is finished, not cut off
            with contextlib.suppress(asyncio.TimeoutError, ValuemeshError):
                await asyncio.wait_for(eng.settle(), STOP_SETTLE_S)
        for t in [*self._tasks, *self._streams.values(), *self._background]:
            t.cancel()
        for t in [*self._tasks, *self._streams.values(), *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.stop()
        if self.peers is not None:
            await self.peers.stop()
        if self.transport is not None:
            await self.transport.stop()
        if self.store is not None:
            await self._save_peers()
        if self._runner is not None:
            await self._runner.cleanup()
        self.home.clear_api_address()
        if self.store is not None:
            await self.store.close()
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
                        await self._effects(eng, await eng.tick(now))
                    if forward and eng.pending and not eng.is_core():
                        # Until our records are final, keep handing them to core
                        # members: a link may have dropped, or a core node restarted.
                        await self._forward(eng, list(eng.pending.values()))
                    if forward:
                        self._check_stuck(eng, time.monotonic())
                    if eng.checkpoints_out:  # signed in the background since the last step
                        await self._effects(eng, Effects())
                except ValuemeshError as exc:
                    log.warning("tick failed for %s: %s", eng.text_id, exc.message)

    async def _save_peers(self) -> None:
        assert self.store is not None
        now, wall = time.monotonic(), now_ms()
        saved = self.table.saved(now)
        if not saved:
            return
        async with self.store.batch() as tx:
            for a in saved:
                tx.put_peer(PeerInfo(a.member, a.address.host, a.address.port, str(a.source),
                                     wall - int(a.age * 1000), 0 if a.reached else max(1, a.dial_failures)))

    # -- transport handler ---------------------------------------------------------
    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        # Anyone on our network may connect (an invitee must reach us to join);
        # constellation data is only ever sent to its members (see may_receive).
        return remote != self.identity.member

    async def on_connect(self, link: PeerLink) -> None:
        self.links[link.remote] = link
        await self._send(link, m.Hello(sorted(self.engines), self.listen_port, version("valuemesh")))
        await self._links_changed()
        if self.peers is not None:
            offer = self.peers.exchange_offer(link.remote)[: m.MAX_PEERS_PER_EXCHANGE]
            if offer:
                await self._send(link, m.PeerExchange(
                    [[e.member.key, e.address.host, e.address.port, int(e.age)] for e in offer]))

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        if self.links.get(link.remote) is link:
            del self.links[link.remote]
            self.peer_constellations.pop(link.remote, None)
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
                    await self._effects(eng, await eng.set_unreachable(down, now_ms()))

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        if self.peers is not None:
            self.peers.heard_from(link.remote)
        try:
            msg = m.decode_message(payload)
            await self._dispatch(link, msg)
        except RemoteError as exc:
            log.info("bad data from %s: %s", link.remote.short, exc.message)
            link.penalize(PENALTY_INVALID, exc.message)
        except ValuemeshError as exc:
            log.warning("could not handle a message from %s: %s", link.remote.short, exc.message)
        except Exception:
            log.exception("internal error while handling a message from %s", link.remote.short)

    async def _send(self, link: PeerLink, msg: m.Message) -> None:
        try:
            await link.send(m.encode_message(msg))
        except (ValuemeshError, ConnectionError, TimeoutError) as exc:
            log.debug("could not send %s to %s: %s", msg.t, link.remote.short, exc)

    async def _dispatch(self, link: PeerLink, msg: m.Message) -> None:
        log.debug("got %s from %s", msg.t, link.remote.short)
        if isinstance(msg, m.Hello):
            self.peer_constellations[link.remote] = set(msg.constellations)
            if self.peers is not None:
                self.peers.link_up(link, listen_port=msg.listen_port or None)
            for cid in msg.constellations:
                eng = self.engines.get(cid)
                # Only a member asks to sync (a read-only imported copy would be refused).
                if eng is not None and eng.may_receive(link.remote) and eng.taking_part():
                    await self._send_heads(link, eng)
        elif isinstance(msg, m.Heads):
            eng = self._engine_for_peer(link, msg.c)
            self._start_stream(link, eng, msg.epoch, msg.since, msg.as_dict())
            # A peer syncing may have missed our signatures of the epoch ends it is closing.
            for cp in eng.own_checkpoints_from(msg.epoch - 1):
                await self._send(link, m.CheckpointSig(eng.cid, cp.encode()))
        elif isinstance(msg, m.Blocks):
            eng = self._engine_for_peer(link, msg.c)
            if eng.cid in self._chain_waiters:
                return  # starting from a checkpoint: what we need comes by sync once it is in place
            await self._receive_blocks(link, eng, msg.blocks, msg.left)
        elif isinstance(msg, m.GetBlocks):
            eng = self._engine_for_peer(link, msg.c)
            assert self.store is not None
            # Raw rows (the peer decodes and verifies what it takes), in messages of at most
            # SYNC_BATCH blocks and SYNC_BATCH_BYTES: large blocks must not push one past the limit.
            for chunk in _sync_chunks(await self.store.get_raw_blocks(eng.cid, msg.ids)):
                await self._send(link, m.Blocks(eng.cid, chunk, 0))
                if link.closed:
                    return
        elif isinstance(msg, m.SubmitRecords):
            # Decode all, then verify all on the node's cores: faster, same first error.
            recs = decode_records(msg.records, batch_verifier=self.verifier)
            eng = self.engines.get(msg.c)
            known = eng is not None and eng.may_receive(link.remote)
            if eng is not None and not known and recs and all(
                    r.author == link.remote and r.type == "membership" and r.body.get("op") == "join"
                    for r in recs):
                # An invitee re-sending its join (e.g. after we restarted): the
                # precheck below decides whether its invite is valid.
                eng.applicants.add(link.remote.key)
            eng = self._engine_for_peer(link, msg.c)
            good = []
            for r in recs:
                try:
                    eng.precheck(r)
                    good.append(r)
                except ValuemeshError as exc:
                    await self._send(link, m.Refuse(exc.message[:500]))
            if not good and not known:
                eng.applicants.discard(link.remote.key)
            if good:
                await self._effects(eng, await eng.submit(good, now_ms()))
        elif isinstance(msg, m.JoinRequest):
            await self._on_join_request(link, msg)
        elif isinstance(msg, m.JoinReply):
            fut = self._join_waiters.get(msg.c)
            if fut is not None and not fut.done() and self._join_asked.get(msg.c) is link:
                genesis = decode_record(msg.genesis)
                if genesis.constellation != msg.c or genesis.seq != 0 or genesis.type != "membership":
                    raise RemoteError("The peer sent a genesis of another constellation.")
                self._join_links[msg.c] = link
                fut.set_result(genesis)
        elif isinstance(msg, m.Refuse):
            log.info("peer %s refused: %s", link.remote.short, msg.reason)
            for cid, fut in self._join_waiters.items():
                # Only the member we asked can refuse our join.
                if not fut.done() and self._join_asked.get(cid) is link:
                    fut.set_exception(LocalError(f"The member refused the join: {msg.reason}"))
        elif isinstance(msg, m.Proof):
            eng = self._engine_for_peer(link, msg.c)
            proof = EquivocationProof.decode(msg.proof)
            await eng.store_proof(proof, now_ms())
            log.warning("equivocation by %s in %s", proof.author, eng.text_id)
        elif isinstance(msg, m.CheckpointSig):
            # Not only from peers we know as members yet: a node still catching up may not
            # have applied the signer's join, and the signature is checked against the
            # epoch's committee anyway (it carries no constellation data).
            eng = self.engines.get(msg.c)
            if eng is None:
                raise RemoteError("The peer sent a checkpoint of a constellation this node does not follow.")
            await eng.add_checkpoint(Checkpoint.decode(msg.cp))
        elif isinstance(msg, m.GetCheckpoint):
            eng = self._engine_for_peer(link, msg.c)
            links, snap = await eng.checkpoint_chain()
            await self._send(link, m.CheckpointChain(eng.cid, links, len(snap.raw) if snap else 0,
                                                     snap.final if snap else 0))
        elif isinstance(msg, m.CheckpointChain):
            waiter = self._chain_waiters.get(msg.c)
            if waiter is None or waiter[0] is not link or waiter[1].done():
                raise RemoteError("The peer sent a checkpoint chain nobody asked it for.")
            waiter[1].set_result(msg)
        elif isinstance(msg, m.GetSnapshot):
            eng = self._engine_for_peer(link, msg.c)
            assert self.store is not None
            found = await self.store.snapshot_part(eng.cid, msg.epoch, msg.offset, m.SNAPSHOT_CHUNK)
            if found is None:
                raise RemoteError("The peer asked for a snapshot part this node does not hold.")
            part, total = found
            await self._send(link, m.SnapshotPart(eng.cid, msg.epoch, msg.offset, part, total))
        elif isinstance(msg, m.SnapshotPart):
            parts = self._snapshot_parts.get(msg.c)
            if parts is None or parts[0] is not link:
                raise RemoteError("The peer sent a snapshot part nobody asked it for.")
            parts[1].put_nowait(msg)
        elif isinstance(msg, m.PeerExchange):
            if self.peers is not None:
                try:
                    entries = [ExchangeEntry(MemberId(k), Address(h, p), float(age)) for k, h, p, age in msg.peers]
                except ValuemeshError as exc:
                    raise RemoteError(f"A peer-exchange entry is invalid: {exc.message}") from None
                self.peers.exchange_received(link, entries)

    def _engine_for_peer(self, link: PeerLink, cid: bytes) -> Engine:
        eng = self.engines.get(cid)
        if eng is None or not eng.may_receive(link.remote):
            raise RemoteError("The peer sent data for a constellation it does not share with us.")
        return eng

    async def _send_heads(self, link: PeerLink, eng: Engine) -> None:
        assert self.store is not None
        floor = eng.consensus.epoch  # closed epochs are of no use to us any more
        heads = await self.store.heads(eng.cid, floor)
        entries = sorted([k.key, e, r] for (k, e), r in heads.items())
        entries.sort(key=lambda h: h[1])  # if ever too many, the oldest epochs matter most
        since = max(eng.consensus.decided_round + 1, 0)
        await self._send(link, m.Heads(eng.cid, floor, since, entries[: m.MAX_HEADS]))

    def _start_stream(self, link: PeerLink, eng: Engine, floor: int, since: int,
                      their: dict[tuple[bytes, int], int]) -> None:
        """Stream a gap from its own task, so the link's reader keeps reading
        (two peers catching each other up must never wait on each other)."""
        key = (link.remote, eng.cid)
        old = self._streams.get(key)
        if old is not None and not old.done():
            old.cancel()
        task = asyncio.create_task(self._stream_gap(link, eng, floor, since, their))
        self._streams[key] = task
        task.add_done_callback(lambda t: self._streams.pop(key, None) if self._streams.get(key) is t else None)

    async def _stream_gap(self, link: PeerLink, eng: Engine, floor: int, since: int,
                          their: dict[tuple[bytes, int], int]) -> None:
        """Send every block the peer lacks from its epoch on, epoch by epoch and oldest rounds
        first, in bounded batches (so it can close each epoch before the next one arrives);
        the window of its epoch from its first undecided round on goes whole."""
        assert self.store is not None
        mine = await self.store.heads(eng.cid, floor)
        lag = {(mid.key, e): their.get((mid.key, e), -1) for (mid, e), r in mine.items()
               if r > their.get((mid.key, e), -1)}
        window_end = since + m.SYNC_WINDOW_ROUNDS

        def wanted(b: StoredBlock) -> bool:  # b is of an epoch >= floor
            return (b.epoch == floor and since <= b.round < window_end) or \
                b.round > their.get((b.author.key, b.epoch), -1)

        epochs = sorted({e for _, e in lag} | {floor})
        total = sum(mine[(MemberId(k), e)] - r for (k, e), r in lag.items())
        sent = 0
        chunk: list[bytes] = []
        size = 0
        for epoch in epochs:
            starts = [r + 1 for (_, e), r in lag.items() if e == epoch]
            window_only = not starts  # nothing past its heads here: just the window
            if epoch == floor:
                starts.append(since)
            # Raw rows: the peer decodes and verifies what it takes, we only relay the bytes.
            async for b in self.store.iter_raw_blocks(eng.cid, from_round=min(starts), epoch=epoch,
                                                      page=SYNC_BATCH):
                if window_only and b.round >= window_end:
                    break
                if not wanted(b):
                    continue
                if chunk and size + len(b.raw) > SYNC_BATCH_BYTES:
                    sent += len(chunk)
                    await self._send(link, m.Blocks(eng.cid, chunk, max(0, total - sent)))
                    chunk, size = [], 0
                    if link.closed:
                        return
                chunk.append(b.raw)
                size += len(b.raw)
                if len(chunk) == SYNC_BATCH:
                    sent += len(chunk)
                    await self._send(link, m.Blocks(eng.cid, chunk, max(0, total - sent)))
                    chunk, size = [], 0
                    if link.closed:
                        return
        if chunk:
            await self._send(link, m.Blocks(eng.cid, chunk, 0))

    async def _receive_blocks(self, link: PeerLink, eng: Engine, raws: list[bytes], left: int) -> None:
        t_rx = time.monotonic()
        # A block taken already (from another peer's stream) is neither decoded nor verified again;
        # the signatures of all the others go to the node's cores as one batch.
        blocks = decode_blocks([raw for raw in raws if not eng.seen_before(raw)], batch_verifier=self.verifier)
        if any(b.constellation != eng.cid for b in blocks):
            raise RemoteError("A block in the batch belongs to another constellation.")
        tr = trace.tracer
        if tr is not None:
            tr.event("verified", rx=t_rx, rd=link.read_at, b=[[b.author.key.hex()[:8], b.round] for b in blocks])
        eff, errors = await eng.add_blocks(blocks, now_ms())
        eng.catchup["blocks_left"] = left
        if left and time.monotonic() - self._last_progress_log >= PROGRESS_LOG_S:
            self._last_progress_log = time.monotonic()
            log.info("catching up %s from %s: %d blocks done, %d left, %d records final", eng.text_id,
                     link.remote.short, eng.catchup["blocks_done"], left, eng.final_count)
        for e in errors[:3]:
            log.info("rejected block from %s: %s", link.remote.short, e)
        if errors:
            link.penalize(PENALTY_INVALID * len(errors), errors[0])
        await self._effects(eng, eff, source=link)

    async def _effects(self, eng: Engine, eff: Effects, source: PeerLink | None = None) -> None:
        if eng.next_tick is not None:
            self._wake.set()  # the tick loop recomputes how long it may sleep
        for b in [*eff.blocks, *eff.rebroadcast]:
            await self._broadcast(eng, m.Blocks(eng.cid, [b.raw], 0))
        if trace.tracer is not None and eff.blocks:
            trace.tracer.event("sent", own=[b.round for b in eff.blocks])
        if eff.request_sync:
            for key, link in list(self.links.items()):
                if eng.may_receive(key):
                    await self._send_heads(link, eng)
        if eff.missing:
            ask = m.GetBlocks(eng.cid, eff.missing[: m.MAX_IDS])
            targets = [source] if source is not None else [lk for k, lk in self.links.items() if eng.may_receive(k)]
            for link in targets:
                await self._send(link, ask)
        for p in eff.proofs:
            await self._broadcast(eng, m.Proof(eng.cid, p.encode()))
        while eng.checkpoints_out:
            await self._broadcast(eng, m.CheckpointSig(eng.cid, eng.checkpoints_out.pop(0).encode()))

    async def _broadcast(self, eng: Engine, msg: m.Message) -> None:
        payload = m.encode_message(msg)
        for key, link in list(self.links.items()):
            if eng.may_receive(key):
                with contextlib.suppress(ValuemeshError, ConnectionError, asyncio.TimeoutError):
                    await link.send(payload)

    # -- joining -------------------------------------------------------------------
    async def _on_join_request(self, link: PeerLink, msg: m.JoinRequest) -> None:
        inv = decode_invite(msg.token)
        eng = self.engines.get(inv.constellation)
        if eng is None:
            await self._send(link, m.Refuse("This node does not follow that constellation."))
            return
        record = decode_record(msg.record)
        reason = None
        if record.author != link.remote:
            reason = "The join record is not signed by the connecting member."
        elif record.type != "membership" or record.body.get("op") != "join" or record.body.get("token") != msg.token:
            reason = "The join record does not carry this invite."
        else:
            try:
                eng.precheck(record)
            except ValuemeshError as exc:
                reason = exc.message
        if reason is not None:
            await self._send(link, m.Refuse(reason))
            return
        # Welcome first, take the join record only once the joiner sends it back:
        # a joiner that cannot follow this constellation (a plugin it lacks)
        # refuses before it ever becomes a member.
        eng.applicants.add(link.remote.key)
        await self._send(link, m.JoinReply(eng.cid, eng.genesis.raw))

    async def join(self, token: str) -> dict[str, Any]:
        inv = parse_token(token)
        if now_ms() > inv.expires:
            raise LocalError("The invite token has expired; ask for a new one.")
        if inv.constellation in self.engines:
            raise LocalError(f"This node already follows {constellation_text(inv.constellation)}.")
        assert self.store is not None
        seq = await self.store.next_seq(inv.constellation, self.identity.member)
        body: dict[str, Any] = {"op": "join", "token": inv.raw()}
        name = str(self.home.config().get("name", ""))
        if name:
            body["name"] = name[:64]
        record = Record.create(self.identity, type="membership", v=1, constellation=inv.constellation,
                               seq=seq, body=body, created=now_ms())
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._join_waiters[inv.constellation] = fut
        try:
            genesis = await self._contact_inviters(inv, record, fut)
        finally:
            self._join_waiters.pop(inv.constellation, None)
            self._join_asked.pop(inv.constellation, None)
        try:
            eng = Engine(self.store, self.registry, self.identity, genesis)
            eng.retain_epochs = self.retain_epochs
        except ValuemeshError:
            self._join_links.pop(inv.constellation, None)
            raise
        await eng.register(now_ms(), inv.tier, join=record)
        self.engines[eng.cid] = eng
        welcomer = self._join_links.pop(inv.constellation, None)
        if welcomer is not None:
            await self._send(welcomer, m.SubmitRecords(eng.cid, [record.raw]))
        await self._forward(eng, [record])
        # Fetching a checkpoint can take a while for a large ledger: the join answers now.
        task = asyncio.create_task(self._first_sync(eng, welcomer, inv.inviter))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return {"id": eng.text_id, "name": eng.name, "record": record.id.hex(), "status": "pending"}

    async def _first_sync(self, eng: Engine, welcomer: PeerLink | None, inviter: MemberId) -> None:
        """A newcomer's first sync: from the welcomer's checkpoint if it offers one worth it,
        then heads to every peer that holds the constellation."""
        if welcomer is not None:
            await self._start_from_checkpoint(welcomer, eng)
        for key, link in list(self.links.items()):
            await self._send(link, m.Hello(sorted(self.engines), self.listen_port, version("valuemesh")))
            if eng.may_receive(key) or key == inviter:
                await self._send_heads(link, eng)

    async def _start_from_checkpoint(self, link: PeerLink, eng: Engine) -> bool:
        """Start a newcomer's engine from the welcomer's latest certified checkpoint, if it
        has one covering at least `checkpoint_start_min_records` final records. On any
        failure the node syncs from genesis instead."""
        got = await self._fetch_checkpoint(link, eng, self.checkpoint_start_min_records, "syncing from genesis")
        if got is None:
            return False
        try:
            await eng.install_snapshot(*got)
        except ValuemeshError as exc:
            log.warning("could not start from a checkpoint (%s); syncing from genesis", exc.message,
                        extra={"c": eng.text_id})
            return False
        log.info("started from the checkpoint of epoch %d", got[0].epoch,
                 extra={"c": eng.text_id, "epoch": got[0].epoch})
        return True

    async def _skip_ahead(self, link: PeerLink, eng: Engine) -> None:
        """A node stuck behind epochs its peers no longer hold blocks of (they prune) skips
        ahead to a peer's latest certified checkpoint, then syncs from there."""
        got = await self._fetch_checkpoint(link, eng, 0, "still behind")
        if got is None or got[0].epoch < eng.committee.epoch:
            return
        try:
            eff = await eng.fast_forward(*got)
        except ValuemeshError as exc:
            log.warning("could not skip ahead to a checkpoint (%s)", exc.message, extra={"c": eng.text_id})
            return
        log.info("skipped ahead to the checkpoint of epoch %d", got[0].epoch,
                 extra={"c": eng.text_id, "epoch": got[0].epoch})
        await self._effects(eng, eff)
        for key, lk in list(self.links.items()):
            if eng.may_receive(key):
                await self._send_heads(lk, eng)

    def _check_stuck(self, eng: Engine, now: float) -> None:
        """Start `_skip_ahead` for an engine that holds blocks two epochs or more ahead of
        its own and has ordered nothing for SKIP_AHEAD_STALL_S (a peer that could send the
        blocks in between would have made it progress)."""
        if eng.loading or eng.consensus.epoch_seen < eng.consensus.epoch + SKIP_AHEAD_EPOCHS:
            self._stuck.pop(eng.cid, None)
            return
        since, index = self._stuck.get(eng.cid, (now, eng.commit_index))
        if index != eng.commit_index:
            since, index = now, eng.commit_index
        self._stuck[eng.cid] = (since, index)
        if now - since < SKIP_AHEAD_STALL_S or eng.cid in self._chain_waiters:
            return
        links = [lk for k, lk in self.links.items() if eng.may_receive(k) and not lk.closed]
        if links:
            self._stuck[eng.cid] = (now, index)  # the next try waits a full stall again
            task = asyncio.create_task(self._skip_ahead(links[int(now) % len(links)], eng))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _fetch_checkpoint(self, link: PeerLink, eng: Engine, min_records: int,
                                fallback: str) -> tuple[Snapshot, list[StoredCheckpoint]] | None:
        """Ask `link` for its latest certified checkpoint and fetch its snapshot, if that
        covers at least `min_records` final records more than we hold.

        Every link of the certificate chain is checked from the genesis committee on, and the
        snapshot against the last certificate's hash, so a peer can only withhold a
        checkpoint, never forge one. None (and a log line) on any failure.
        """
        fut: asyncio.Future[m.CheckpointChain] = asyncio.get_running_loop().create_future()
        self._chain_waiters[eng.cid] = (link, fut)
        try:
            await self._send(link, m.GetCheckpoint(eng.cid))
            chain = await asyncio.wait_for(fut, CHECKPOINT_TIMEOUT_S)
            if not chain.links or chain.final - eng.final_count < min_records:
                return None
            links = [(CheckpointCertificate.from_map(cbor.decode(a)), decode_committee(b)) for a, b in chain.links]
            committee = verify_chain(eng.genesis_committee, links)
            cert = links[-1][0]
            raw = await self._fetch_snapshot(link, eng.cid, cert.epoch, chain.size)
            snap = Snapshot.decode(raw)
            c = cert.content
            if snap.hash != c.snapshot_hash or (snap.constellation, snap.epoch, snap.round, snap.index) != (
                    eng.cid, c.epoch, c.round, c.index):
                raise RemoteError("The snapshot is not the one its checkpoint certifies.")
            if eng.snapshot_committee(snap) != committee:
                raise RemoteError("The snapshot's committee is not the one its checkpoint attests.")
            return snap, [StoredCheckpoint.of(cc.content, {mm.key: sig for mm, sig in cc.signatures},
                                              encode_committee(nxt)) for cc, nxt in links]
        except (ValuemeshError, TimeoutError, ConnectionError) as exc:
            reason = exc.message if isinstance(exc, ValuemeshError) else type(exc).__name__
            log.warning("could not take a checkpoint from %s (%s); %s", link.remote.short, reason, fallback,
                        extra={"c": eng.text_id})
            return None
        finally:
            self._chain_waiters.pop(eng.cid, None)
            self._snapshot_parts.pop(eng.cid, None)

    async def _fetch_snapshot(self, link: PeerLink, cid: bytes, epoch: int, size: int) -> bytes:
        queue: asyncio.Queue[m.SnapshotPart] = asyncio.Queue()
        self._snapshot_parts[cid] = (link, queue)
        got = bytearray()
        for _ in range(size // m.SNAPSHOT_CHUNK + 1):  # bounded: one part per chunk
            if len(got) >= size:
                break
            await self._send(link, m.GetSnapshot(cid, epoch, len(got)))
            part = await asyncio.wait_for(queue.get(), CHECKPOINT_TIMEOUT_S)
            if part.epoch != epoch or part.offset != len(got) or part.total != size:
                raise RemoteError("The peer sent a snapshot part other than the one asked for.")
            got += part.data
        if len(got) != size:
            raise RemoteError("The peer's snapshot is not the size it announced.")
        return bytes(got)

    async def _contact_inviters(self, inv: Invite, record: Record, fut: asyncio.Future[Record]) -> Record:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        tried: list[str] = []
        assert self.transport is not None
        for host, port in inv.addrs:
            link = self.links.get(inv.inviter)
            if link is None or link.closed:
                try:
                    link = await self.transport.connect(host, port)
                except (ValuemeshError, OSError, TimeoutError):
                    tried.append(f"{host}:{port}")
                    continue
                if self.peers is not None:
                    with contextlib.suppress(ValuemeshError):
                        self.peers.add_known(link.remote, Address(host, port), Source.INVITE)
            self._join_asked[inv.constellation] = link
            await self._send(link, m.JoinRequest(inv.raw(), record.raw))
            try:
                return await asyncio.wait_for(asyncio.shield(fut), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                tried.append(f"{host}:{port}")
        if fut.done():
            return fut.result()
        raise LocalError(f"No member could be reached to join (tried {', '.join(tried) or 'no address'}).")

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

    def addresses(self) -> list[str]:
        host = self.listen_host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return [f"{host}:{self.listen_port}"]

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
            doc["constellations"] = [constellation_text(c) for c in sorted(self.peer_constellations.get(mid, ()))]
            out.append(doc)
        return out

    def status(self) -> dict[str, Any]:
        cons = [views.summary(e) for e in self.engines.values()]
        health = "ok"
        if any(c["pending"] and c["core"] > 1 and not self.links for c in cons):
            health = "degraded: no peers connected, records cannot become final"
        return {"health": health, "member": str(self.identity.member), "listen": self.addresses()[0],
                "uptime_s": int(time.time() - self.started_at), "peers": self.peer_list(), "constellations": cons}

    def constellation_list(self) -> list[dict[str, Any]]:
        return [{k: s[k] for k in ("id", "name", "members", "status", "my_tier", "guarantee")}
                for s in (views.summary(e) for e in self.engines.values())]

    async def add_peer(self, address: str) -> dict[str, Any]:
        host, port = parse_peer_address(address)
        if self.peers is not None:
            self.peers.add_bootstrap([address])
        return {"address": f"{host}:{port}"}

    async def create_constellation(self, name: str, purpose: str) -> dict[str, Any]:
        if len(name) > 128 or len(purpose) > 1000:
            raise LocalError("The name must be at most 128 characters and the purpose at most 1000.")
        assert self.store is not None
        plugins = {n: str(p.version) for n, p in self.registry.plugins.items()}
        genesis = make_genesis(self.identity, name=name, purpose=purpose, nonce=secrets.token_bytes(16),
                               created=now_ms(), plugins=plugins)
        await self.store.reserve_seq(genesis.constellation, self.identity.member)
        eng = Engine(self.store, self.registry, self.identity, genesis)
        eng.retain_epochs = self.retain_epochs
        await eng.register(now_ms())
        self.engines[eng.cid] = eng
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
        out = [parse_hostport(a) for a in self.addresses()]
        for v in self.table.snapshot(time.monotonic()):
            if v.linked and v.via is not None and eng.may_receive(MemberId.parse(v.member)):
                out.extend((a.host, a.port) for a in v.addresses if a.ok_ago is not None)
        return tuple(dict.fromkeys(out))[:8]

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
        return (await self.submit_many(eng, [(rtype, body)]))[0]

    async def submit_many(self, eng: Engine, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        assert self.store is not None
        # The seqs are taken and the signed records stored in one transaction, under
        # one lock: a signed record never leaves this process before it is durable,
        # so a crash can neither reuse a seq that escaped nor leave a gap that
        # would hold back every later record of ours. Every record is checked before
        # any is stored (all or nothing per request); a refused one was never seen outside.
        # Requests queue up, and one task signs and stores every request queued so far in
        # one transaction (one fsync for all of them, a group commit): one record per
        # request no longer costs one fsync per record.
        job: _SubmitJob = (eng, items, asyncio.get_running_loop().create_future())
        self._submit_queue.append(job)
        if self._submitter is None or self._submitter.done():
            self._submitter = asyncio.create_task(self._drain_submits())
        # Shielded: a request whose client went away leaves its job to finish (or not) as
        # a whole, never half done.
        return await asyncio.shield(job[2])

    async def _drain_submits(self) -> None:
        """Sign and store every queued request at once, answer them, then propose; repeat
        while requests keep arriving (each pass takes only requests that exist)."""
        while self._submit_queue:
            jobs, self._submit_queue = self._submit_queue, []
            try:
                async with self._sign_lock:
                    stored = await self._sign_and_store(jobs)
            except Exception:
                log.exception("internal error while signing new records")
                for _e, _i, fut in jobs:
                    if not fut.done():
                        fut.set_exception(LocalError("The node could not sign the records; see its log."))
                continue
            # Proposing makes (and durably stores) our block; requests that queue meanwhile
            # are the next pass's group.
            for cid, (fresh, recs) in stored.items():
                eng = self.engines[cid]
                try:
                    if fresh:
                        await self._effects(eng, await eng.propose(fresh, now_ms()))
                    if not eng.is_core():
                        await self._forward(eng, recs)
                except ValuemeshError as exc:
                    # Stored and pending: the tick loop hands them on, a restart re-proposes them.
                    log.warning("could not propose new records in %s: %s", eng.text_id, exc.message)
                except Exception:
                    log.exception("internal error while proposing new records in %s", eng.text_id)

    async def _sign_and_store(self, jobs: list[_SubmitJob]) -> dict[bytes, tuple[list[Record], list[Record]]]:
        """Sign the queued requests with consecutive seqs and store them all in one durable
        transaction, then answer each. Returns, per constellation, the new records to
        propose and all records signed. A request that fails its checks is refused alone
        and its seqs go to the next one."""
        assert self.store is not None
        signed: list[tuple[_SubmitJob, list[Record]]] = []
        by_engine: dict[bytes, list[Record]] = {}
        next_seq: dict[bytes, int] = {}
        for job in jobs:
            eng, items, fut = job
            if fut.done():
                continue
            try:
                if eng.cid not in next_seq:
                    known = self._own_next.get(eng.cid)
                    stored = known[1] if known is not None and known[0] is eng else \
                        await self.store.next_seq(eng.cid, self.identity.member)
                    next_seq[eng.cid] = max(stored, eng.ledger.next_seq(self.identity.member))
                taken = by_engine.get(eng.cid, [])
                recs = []
                for i, (rtype, body) in enumerate(items):
                    plugin = self.registry.get(rtype)
                    rec = Record.create(self.identity, type=rtype, v=plugin.version.major, constellation=eng.cid,
                                        seq=next_seq[eng.cid] + i, body=body, created=now_ms())
                    try:
                        eng.precheck(rec, queued=len(taken) + i)
                    except ValuemeshError as exc:
                        raise LocalError(exc.message) from None
                    recs.append(rec)
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
                continue
            next_seq[eng.cid] += len(recs)
            by_engine.setdefault(eng.cid, []).extend(recs)
            signed.append((job, recs))
        out: dict[bytes, tuple[list[Record], list[Record]]] = {}
        failed: dict[bytes, Exception] = {}
        for cid, recs in by_engine.items():
            # Unknown until the transaction is known to have committed (an error or a
            # cancellation in between leaves it to the store to say).
            self._own_next.pop(cid, None)
            try:
                out[cid] = (await self.engines[cid].store_pending(recs, now_ms()), recs)
                self._own_next[cid] = (self.engines[cid], next_seq[cid])
            except Exception as exc:
                # Nothing of a failed transaction is stored and none of its records has
                # left this process; only its requests are refused.
                failed[cid] = exc
        if trace.tracer is not None:
            trace.tracer.event("pending", ids=[r.id.hex()[:12] for c, recs in by_engine.items() if c in out
                                               for r in recs])
        for (e, _i, fut), recs in signed:
            if fut.done():
                continue
            if e.cid in failed:
                fut.set_exception(failed[e.cid])
            else:
                fut.set_result([{"id": r.id.hex(), "seq": r.seq, "status": "pending"} for r in recs])
        return out

    async def _forward(self, eng: Engine, records: list[Record]) -> None:
        """Hand records to the core members we are connected to (we are not core now)."""
        core = eng.current_committee()
        for i in range(0, len(records), m.MAX_BATCH):
            msg = m.SubmitRecords(eng.cid, [r.raw for r in records[i:i + m.MAX_BATCH]])
            for key, link in list(self.links.items()):
                if key in core:
                    await self._send(link, msg)


# One API request waiting to be signed: its engine, its (type, body) items, its answer.
_SubmitJob = tuple[Engine, list[tuple[str, dict[str, Any]]], "asyncio.Future[list[dict[str, Any]]]"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"t": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k in ("c", "epoch", "start_round"):
            if hasattr(record, k):
                doc[k] = getattr(record, k)
        if record.exc_info:  # an internal error is useless to an operator without its traceback
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _sync_chunks(raws: Sequence[bytes]) -> Iterator[list[bytes]]:
    """Consecutive groups of at most SYNC_BATCH blocks and SYNC_BATCH_BYTES (a larger block
    goes alone: any block fits one message)."""
    chunk: list[bytes] = []
    size = 0
    for raw in raws:
        if chunk and (len(chunk) == SYNC_BATCH or size + len(raw) > SYNC_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw)
    if chunk:
        yield chunk


def _config_count(cfg: dict[str, Any], key: str, default: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise LocalError(f"The config value '{key}' must be a whole number of 0 or more.")
    return v


def run_daemon(home: Home, *, listen: str | None, api: str | None, bootstrap: list[str], mdns: bool,
               mdns_interfaces: list[str], network: str | None) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=os.environ.get("VALUEMESH_LOG", "INFO").upper(), handlers=[handler])
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    identity = home.load_identity()
    cfg = home.config()
    node = Node(home, identity, listen=listen or cfg.get("listen", "0.0.0.0:7470"),
                api=api or cfg.get("api", "127.0.0.1:7471"), network=network or cfg.get("network", "valuemesh-main"),
                bootstrap=bootstrap or cfg.get("bootstrap", []), mdns=mdns, mdns_interfaces=mdns_interfaces,
                checkpoint_start_min_records=_config_count(cfg, "checkpoint_start_min_records",
                                                           CHECKPOINT_START_MIN_RECORDS),
                retain_epochs=_config_count(cfg, "retain_epochs", 0) or None,
                verify_threads=_config_count(cfg, "verify_threads", 0) or None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await node.start()
        # Everything so far (modules, the replayed ledger and DAG) lives as long as the process:
        # keep it out of the cycle collector's scans. A full collection over it paused the loop
        # for 36-76 ms at light load on 4 daemons, a latency spike on every node it hit.
        gc.freeze()
        print(json.dumps({"ready": True, "member": str(identity.member), "listen": node.addresses()[0],
                          "api": f"{node.api_host}:{node.api_port}"}), flush=True)
        try:
            await stop.wait()
        finally:
            await node.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise LocalError(f"The daemon could not start: {exc.strerror or exc}.") from None
