"""Block gossip and sync between members: heads, streaming a peer's gap, taking blocks in,
carrying out an engine's effects (broadcast, sync requests, missing parents, proofs).

Push-first: a node's new blocks go to every connected member at once; on connect, peers
exchange per-author heads and stream each other's gaps in batches; missing parents are
fetched by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from valuemesh.node import trace
from valuemesh.node.clock import now_ms
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, Send, Spawn, engine_for_peer, members_links
from valuemesh.node.store import Store, StoredBlock
from valuemesh.node.verify import ParallelVerifier
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import EquivocationProof, Record, decode_blocks, decode_records

log = logging.getLogger("valuemesh.daemon")  # the daemon's logger, as before the split: log filters keep working
PROGRESS_LOG_S = 2.0
SYNC_BATCH = 128
# Bytes of blocks per Blocks message: well inside a message's limit (m.MAX_MESSAGE_SIZE), so
# a batch of large blocks is split rather than refused; one block always goes alone.
SYNC_BATCH_BYTES = 2 * 1024 * 1024


class Gossip:
    """Moves blocks and records between this node's engines and its members' links."""

    def __init__(self, store: Store, engines: Mapping[bytes, Engine], links: Mapping[MemberId, PeerLink], *,
                 send: Send, verifier: ParallelVerifier, spawn: Spawn, wake: asyncio.Event,
                 fetching: Callable[[bytes], bool]) -> None:
        self.store = store
        self.engines = engines
        self.links = links
        self.send = send
        self.verifier = verifier
        self.spawn = spawn
        self.wake = wake  # set when an engine asks for a tick sooner than the loop sleeps
        self.fetching = fetching  # whether a constellation is starting from a checkpoint
        self.streams: dict[tuple[MemberId, bytes], asyncio.Task[None]] = {}
        self._last_progress_log = 0.0

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.Heads, self.on_heads)
        handlers.add(m.Blocks, self.on_blocks)
        handlers.add(m.GetBlocks, self.on_get_blocks)
        handlers.add(m.SubmitRecords, self.on_submit_records)
        handlers.add(m.Proof, self.on_proof)

    # -- handlers ------------------------------------------------------------------
    async def on_heads(self, link: PeerLink, msg: m.Heads) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        self.start_stream(link, eng, msg.epoch, msg.since, msg.as_dict())
        # A peer syncing may have missed our signatures of the epoch ends it is closing.
        for cp in eng.own_checkpoints_from(msg.epoch - 1):
            await self.send(link, m.CheckpointSig(eng.cid, cp.encode()))

    async def on_blocks(self, link: PeerLink, msg: m.Blocks) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        if self.fetching(eng.cid):
            return  # starting from a checkpoint: what we need comes by sync once it is in place
        await self.receive_blocks(link, eng, msg.blocks, msg.left)

    async def on_get_blocks(self, link: PeerLink, msg: m.GetBlocks) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        # Raw rows (the peer decodes and verifies what it takes), in messages of at most
        # SYNC_BATCH blocks and SYNC_BATCH_BYTES: large blocks must not push one past the limit.
        for chunk in sync_chunks(await self.store.get_raw_blocks(eng.cid, msg.ids)):
            await self.send(link, m.Blocks(eng.cid, chunk, 0))
            if link.closed:
                return

    async def on_submit_records(self, link: PeerLink, msg: m.SubmitRecords) -> None:
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
        eng = engine_for_peer(self.engines, link, msg.c)
        good = []
        for r in recs:
            try:
                eng.precheck(r)
                good.append(r)
            except ValuemeshError as exc:
                await self.send(link, m.Refuse(exc.message[:500]))
        if not good and not known:
            eng.applicants.discard(link.remote.key)
        if good:
            await self.effects(eng, await eng.submit(good, now_ms()))

    async def on_proof(self, link: PeerLink, msg: m.Proof) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        proof = EquivocationProof.decode(msg.proof)
        await eng.store_proof(proof, now_ms())
        log.warning("equivocation by %s in %s", proof.author, eng.text_id)

    # -- sync ----------------------------------------------------------------------
    async def send_heads(self, link: PeerLink, eng: Engine) -> None:
        floor = eng.consensus.epoch  # closed epochs are of no use to us any more
        heads = await self.store.heads(eng.cid, floor)
        # By epoch first: if ever too many, the oldest epochs matter most.
        entries: list[list[bytes | int]] = [[k, e, r] for e, k, r in sorted(
            (e, k.key, r) for (k, e), r in heads.items())]
        since = max(eng.consensus.decided_round + 1, 0)
        await self.send(link, m.Heads(eng.cid, floor, since, entries[: m.MAX_HEADS]))

    async def sync(self, eng: Engine) -> None:
        """Ask every connected member of the constellation for what we lack."""
        for link in members_links(self.links, eng):
            await self.send_heads(link, eng)

    def start_stream(self, link: PeerLink, eng: Engine, floor: int, since: int,
                     their: dict[tuple[bytes, int], int]) -> None:
        """Stream a gap from its own task, so the link's reader keeps reading
        (two peers catching each other up must never wait on each other)."""
        key = (link.remote, eng.cid)
        old = self.streams.get(key)
        if old is not None and not old.done():
            old.cancel()
        task = self.spawn(self.stream_gap(link, eng, floor, since, their))
        self.streams[key] = task
        task.add_done_callback(lambda t: self.streams.pop(key, None) if self.streams.get(key) is t else None)

    async def stream_gap(self, link: PeerLink, eng: Engine, floor: int, since: int,
                         their: dict[tuple[bytes, int], int]) -> None:
        """Send every block the peer lacks from its epoch on, epoch by epoch and oldest rounds
        first, in bounded batches (so it can close each epoch before the next one arrives);
        the window of its epoch from its first undecided round on goes whole."""
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
                    await self.send(link, m.Blocks(eng.cid, chunk, max(0, total - sent)))
                    chunk, size = [], 0
                    if link.closed:
                        return
                chunk.append(b.raw)
                size += len(b.raw)
                if len(chunk) == SYNC_BATCH:
                    sent += len(chunk)
                    await self.send(link, m.Blocks(eng.cid, chunk, max(0, total - sent)))
                    chunk, size = [], 0
                    if link.closed:
                        return
        if chunk:
            await self.send(link, m.Blocks(eng.cid, chunk, 0))

    async def receive_blocks(self, link: PeerLink, eng: Engine, raws: list[bytes], left: int) -> None:
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
        await self.effects(eng, eff, source=link)

    # -- carrying out an engine's effects ----------------------------------------------
    async def effects(self, eng: Engine, eff: Effects, source: PeerLink | None = None) -> None:
        if eng.next_tick is not None:
            self.wake.set()  # the tick loop recomputes how long it may sleep
        for b in [*eff.blocks, *eff.rebroadcast]:
            await self.broadcast(eng, m.Blocks(eng.cid, [b.raw], 0))
        if trace.tracer is not None and eff.blocks:
            trace.tracer.event("sent", own=[b.round for b in eff.blocks])
        if eff.request_sync:
            await self.sync(eng)
        if eff.missing:
            ask = m.GetBlocks(eng.cid, eff.missing[: m.MAX_IDS])
            targets = [source] if source is not None else members_links(self.links, eng)
            for link in targets:
                await self.send(link, ask)
        for p in eff.proofs:
            await self.broadcast(eng, m.Proof(eng.cid, p.encode()))
        while eng.checkpoints_out:
            await self.broadcast(eng, m.CheckpointSig(eng.cid, eng.checkpoints_out.pop(0).encode()))

    async def broadcast(self, eng: Engine, msg: m.Message) -> None:
        payload = m.encode_message(msg)  # encoded once for every member
        for link in members_links(self.links, eng):
            with contextlib.suppress(ValuemeshError, ConnectionError, asyncio.TimeoutError):
                await link.send(payload)

    async def forward(self, eng: Engine, records: list[Record]) -> None:
        """Hand records to the core members we are connected to (we are not core now)."""
        core = eng.current_committee()
        for i in range(0, len(records), m.MAX_BATCH):
            msg = m.SubmitRecords(eng.cid, [r.raw for r in records[i:i + m.MAX_BATCH]])
            for key, link in list(self.links.items()):
                if key in core:
                    await self.send(link, msg)


def sync_chunks(raws: Sequence[bytes]) -> Iterator[list[bytes]]:
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
