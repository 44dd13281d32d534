"""Catching up from a certified checkpoint instead of from genesis: a newcomer's first sync,
skipping ahead when stuck behind pruned epochs, and the checkpoint and snapshot exchange.

A peer can only withhold a checkpoint, never forge one: every link of the certificate chain
is checked from the genesis committee on, and the snapshot against the last certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from valuemesh.node.budgets import Budgets
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.gates import HistoryGate
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import Handlers, Send, Spawn, engine_for_peer, members_links
from valuemesh.node.store import Checkpoint as StoredCheckpoint
from valuemesh.node.store import Store
from valuemesh.protocol import cbor
from valuemesh.protocol import messages as m
from valuemesh.protocol.consensus import (
    Checkpoint,
    CheckpointCertificate,
    decode_committee,
    encode_committee,
    verify_chain,
)
from valuemesh.protocol.errors import RemoteError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.snapshot import Snapshot

log = logging.getLogger("valuemesh.daemon")  # the daemon's logger, as before the split: log filters keep working
# A newcomer starts from the latest certified checkpoint (docs/consensus.md §7) instead of
# replaying every block since genesis when the checkpoint covers at least this many final
# records (config key `checkpoint_start_min_records`; below it, the whole history is cheap).
CHECKPOINT_START_MIN_RECORDS = 10_000
CHECKPOINT_TIMEOUT_S = 10.0  # for the chain and for each snapshot part
# A node holding blocks this many epochs ahead of its own that orders nothing for this long
# is stuck behind blocks its peers pruned: it skips ahead to a checkpoint.
CHAIN_BYTES = m.MAX_MESSAGE_SIZE // 2  # a checkpoint chain must fit one message with room to spare
SKIP_AHEAD_EPOCHS = 2
SKIP_AHEAD_STALL_S = 5.0


class Catchup:
    """Fetches and serves certified checkpoints and their snapshots."""

    def __init__(self, store: Store, engines: Mapping[bytes, Engine], links: Mapping[MemberId, PeerLink], *,
                 send: Send, spawn: Spawn, hello: Callable[[], m.Hello],
                 send_heads: Callable[[PeerLink, Engine], Awaitable[None]],
                 effects: Callable[[Engine, Effects], Awaitable[None]],
                 start_min_records: int = CHECKPOINT_START_MIN_RECORDS,
                 history: HistoryGate | None = None) -> None:
        self.store = store
        self.engines = engines
        self.links = links
        self.send = send
        self.spawn = spawn
        self.hello = hello  # what this node says of itself to a peer
        self.send_heads = send_heads
        self.effects = effects
        self.start_min_records = start_min_records
        self.history = history if history is not None else HistoryGate(Budgets())  # what we serve each peer
        # A pending checkpoint fetch: the link asked, and where its answers go.
        self._chain_waiters: dict[bytes, tuple[PeerLink, asyncio.Future[m.CheckpointChain]]] = {}
        self._snapshot_parts: dict[bytes, tuple[PeerLink, asyncio.Queue[m.SnapshotPart]]] = {}
        self._stuck: dict[bytes, tuple[float, int]] = {}  # since when an engine far behind made no progress

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.CheckpointSig, self.on_checkpoint_sig)
        handlers.add(m.GetCheckpoint, self.on_get_checkpoint)
        handlers.add(m.CheckpointChain, self.on_checkpoint_chain)
        handlers.add(m.GetSnapshot, self.on_get_snapshot)
        handlers.add(m.SnapshotPart, self.on_snapshot_part)

    def fetching(self, cid: bytes) -> bool:
        """Whether a checkpoint of this constellation is being fetched (its blocks wait)."""
        return cid in self._chain_waiters

    # -- handlers ------------------------------------------------------------------
    async def on_checkpoint_sig(self, link: PeerLink, msg: m.CheckpointSig) -> None:
        # Not only from peers we know as members yet: a node still catching up may not
        # have applied the signer's join. The engine checks the signer against the epoch's
        # committee before the signature, and holds early ones bounded (node/epoch_ends.py).
        eng = self.engines.get(msg.c)
        if eng is None:
            raise RemoteError("The peer sent a checkpoint of a constellation this node does not follow.")
        await eng.add_checkpoint(Checkpoint.decode(msg.cp, verify=False))

    async def on_get_checkpoint(self, link: PeerLink, msg: m.GetCheckpoint) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        links, snap = await checkpoint_chain(self.store, eng.cid)
        await self.send(link, m.CheckpointChain(eng.cid, links, len(snap.raw) if snap else 0,
                                                snap.final if snap else 0))

    async def on_checkpoint_chain(self, link: PeerLink, msg: m.CheckpointChain) -> None:
        waiter = self._chain_waiters.get(msg.c)
        if waiter is None or waiter[0] is not link or waiter[1].done():
            raise RemoteError("The peer sent a checkpoint chain nobody asked it for.")
        waiter[1].set_result(msg)

    async def on_get_snapshot(self, link: PeerLink, msg: m.GetSnapshot) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        # A part is history served: it waits for the peer's budget, or is refused past a bound.
        if self.history.wait_for(link.remote, m.SNAPSHOT_CHUNK, time.monotonic()) > \
                self.history.budgets.history_max_wait_s:
            reason = "This node has served its budget of history to you for now."
            await self.send(link, m.Refuse(reason))
            link.penalize(self.history.budgets.over_budget_penalty, reason)
            return
        found = await self.store.snapshot_part(eng.cid, msg.epoch, msg.offset, m.SNAPSHOT_CHUNK)
        if found is None:
            raise RemoteError("The peer asked for a snapshot part this node does not hold.")
        part, total = found
        await asyncio.sleep(self.history.spend(link.remote, len(part), time.monotonic()))
        await self.send(link, m.SnapshotPart(eng.cid, msg.epoch, msg.offset, part, total))

    async def on_snapshot_part(self, link: PeerLink, msg: m.SnapshotPart) -> None:
        parts = self._snapshot_parts.get(msg.c)
        if parts is None or parts[0] is not link:
            raise RemoteError("The peer sent a snapshot part nobody asked it for.")
        parts[1].put_nowait(msg)

    # -- a newcomer ----------------------------------------------------------------------
    async def first_sync(self, eng: Engine, welcomer: PeerLink | None, inviter: MemberId) -> None:
        """A newcomer's first sync: from the welcomer's checkpoint if it offers one worth it,
        then heads to every peer that holds the constellation."""
        if welcomer is not None:
            await self.start_from_checkpoint(welcomer, eng)
        for key, link in list(self.links.items()):
            await self.send(link, self.hello())
            if eng.may_receive(key) or key == inviter:
                await self.send_heads(link, eng)

    async def start_from_checkpoint(self, link: PeerLink, eng: Engine) -> bool:
        """Start a newcomer's engine from the welcomer's latest certified checkpoint, if it
        has one covering at least `start_min_records` final records. On any
        failure the node syncs from genesis instead."""
        got = await self.fetch_checkpoint(link, eng, self.start_min_records, "syncing from genesis")
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

    # -- a node stuck behind -------------------------------------------------------------
    def check_stuck(self, eng: Engine, now: float) -> None:
        """Start `skip_ahead` for an engine that holds blocks two epochs or more ahead of
        its own and has ordered nothing for SKIP_AHEAD_STALL_S (a peer that could send the
        blocks in between would have made it progress)."""
        if eng.loading or eng.consensus.epoch_seen < eng.consensus.epoch + SKIP_AHEAD_EPOCHS:
            self._stuck.pop(eng.cid, None)
            return
        since, index = self._stuck.get(eng.cid, (now, eng.commit_index))
        if index != eng.commit_index:
            since, index = now, eng.commit_index
        self._stuck[eng.cid] = (since, index)
        if now - since < SKIP_AHEAD_STALL_S or self.fetching(eng.cid):
            return
        links = [lk for lk in members_links(self.links, eng) if not lk.closed]
        if links:
            self._stuck[eng.cid] = (now, index)  # the next try waits a full stall again
            self.spawn(self.skip_ahead(links[int(now) % len(links)], eng))

    async def skip_ahead(self, link: PeerLink, eng: Engine) -> None:
        """A node stuck behind epochs its peers no longer hold blocks of (they prune) skips
        ahead to a peer's latest certified checkpoint, then syncs from there."""
        got = await self.fetch_checkpoint(link, eng, 0, "still behind")
        if got is None or got[0].epoch < eng.committee.epoch:
            return
        try:
            eff = await eng.fast_forward(*got)
        except ValuemeshError as exc:
            log.warning("could not skip ahead to a checkpoint (%s)", exc.message, extra={"c": eng.text_id})
            return
        log.info("skipped ahead to the checkpoint of epoch %d", got[0].epoch,
                 extra={"c": eng.text_id, "epoch": got[0].epoch})
        await self.effects(eng, eff)
        for lk in members_links(self.links, eng):
            await self.send_heads(lk, eng)

    # -- fetching ------------------------------------------------------------------------
    async def fetch_checkpoint(self, link: PeerLink, eng: Engine, min_records: int,
                               fallback: str) -> tuple[Snapshot, list[StoredCheckpoint]] | None:
        """Ask `link` for its latest certified checkpoint and fetch its snapshot, if that
        covers at least `min_records` final records more than we hold. None (and a log
        line saying `fallback`) on any failure."""
        fut: asyncio.Future[m.CheckpointChain] = asyncio.get_running_loop().create_future()
        self._chain_waiters[eng.cid] = (link, fut)
        try:
            await self.send(link, m.GetCheckpoint(eng.cid))
            chain = await asyncio.wait_for(fut, CHECKPOINT_TIMEOUT_S)
            if not chain.links or chain.final - eng.final_count < min_records:
                return None
            links = [(CheckpointCertificate.from_map(cbor.decode(a)), decode_committee(b)) for a, b in chain.links]
            committee = verify_chain(eng.genesis_committee, links)
            cert = links[-1][0]
            raw = await self.fetch_snapshot(link, eng.cid, cert.epoch, chain.size)
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

    async def fetch_snapshot(self, link: PeerLink, cid: bytes, epoch: int, size: int) -> bytes:
        queue: asyncio.Queue[m.SnapshotPart] = asyncio.Queue()
        self._snapshot_parts[cid] = (link, queue)
        got = bytearray()
        for _ in range(size // m.SNAPSHOT_CHUNK + 1):  # bounded: one part per chunk
            if len(got) >= size:
                break
            await self.send(link, m.GetSnapshot(cid, epoch, len(got)))
            part = await asyncio.wait_for(queue.get(), CHECKPOINT_TIMEOUT_S)
            if part.epoch != epoch or part.offset != len(got) or part.total != size:
                raise RemoteError("The peer sent a snapshot part other than the one asked for.")
            got += part.data
        if len(got) != size:
            raise RemoteError("The peer's snapshot is not the size it announced.")
        return bytes(got)


async def checkpoint_chain(store: Store, cid: bytes) -> tuple[list[list[bytes]], Snapshot | None]:
    """What a newcomer needs to start from our latest certified epoch end: one link per
    closed epoch from 0 ([certificate, the committee it attests], canonical CBOR), and the
    snapshot of the last link. ([], None) if we cannot offer a complete chain."""
    links: list[list[bytes]] = []
    size = 0
    for i, c in enumerate(await store.checkpoints(cid)):
        if c.epoch != i or not c.next_members:
            break
        cert = CheckpointCertificate(c.content, tuple((MemberId(k), v) for k, v in sorted(c.signatures.items())))
        link = [cbor.encode(cert.to_map()), c.next_members]
        size += len(link[0]) + len(link[1])
        if size > CHAIN_BYTES or len(links) >= m.MAX_CHAIN_LINKS:
            return [], None  # would not fit in one message: the newcomer syncs from genesis
        links.append(link)
    while links:
        snap = await store.latest_snapshot(cid, len(links) - 1)
        if snap is not None:
            return links, snap
        links.pop()
    return [], None
