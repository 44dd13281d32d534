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
from valuemesh.node.budgets import Budgets
from valuemesh.node.clock import now_ms
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.gates import Gates, Refusal
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, Send, Spawn, engine_for_peer, members_links
from valuemesh.node.store import Store, StoredBlock
from valuemesh.node.verify import ParallelVerifier
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError, SignatureError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.invite import decode_invite
from valuemesh.protocol.records import EquivocationProof, Record, decode_blocks, decode_records_unverified

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
                 fetching: Callable[[bytes], bool], budgets: Budgets | None = None) -> None:
        self.store = store
        self.engines = engines
        self.links = links
        self.send = send
        self.verifier = verifier
        self.spawn = spawn
        self.wake = wake  # set when an engine asks for a tick sooner than the loop sleeps
        self.fetching = fetching  # whether a constellation is starting from a checkpoint
        self.streams: dict[tuple[MemberId, bytes], asyncio.Task[None]] = {}
        # What a peer's data must pass before costly work (shared with joining and catch-up).
        self.gates = Gates(budgets or Budgets(), store.equivocation_count)
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
            size = sum(len(raw) for raw in chunk)
            history = self.gates.history
            if history.wait_for(link.remote, size, time.monotonic()) > history.budgets.history_max_wait_s:
                await self.refuse(link, Refusal("This node has served its budget of history to you for now.",
                                                False))
                return
            await asyncio.sleep(history.spend(link.remote, size, time.monotonic()))
            await self.send(link, m.Blocks(eng.cid, chunk, 0))
            if link.closed:
                return

    async def refuse(self, link: PeerLink, *refusals: Refusal) -> None:
        """Tell the peer why, in one sentence, and lower its score: fully for invalid data,
        a little for data over a budget (an honest burst may meet one)."""
        first = refusals[0]
        more = f" ({len(refusals) - 1} more refused)" if len(refusals) > 1 else ""
        await self.send(link, m.Refuse((first.reason + more)[:500]))
        invalid = any(r.invalid for r in refusals)
        link.penalize(PENALTY_INVALID if invalid else self.gates.budgets.over_budget_penalty,
                      next(r for r in refusals if r.invalid or not invalid).reason)

    async def on_submit_records(self, link: PeerLink, msg: m.SubmitRecords) -> None:
        eng = self.engines.get(msg.c)
        if eng is None:
            raise RemoteError("The peer sent records of a constellation this node does not follow.")
        # Membership, constellation, seq window and budgets before any signature is checked.
        got = decode_records_unverified(msg.records)
        if got.error is not None:
            raise got.error
        stranger = not eng.may_receive(link.remote)
        now = time.monotonic()
        wanted, refused = self.gates.records.screen(eng, link.remote, got.items, now, now_ms())
        good = []
        for r in wanted:
            try:
                eng.precheck(r)
                good.append(r)
            except ValuemeshError as exc:
                refused.append(Refusal(exc.message, False))
        if good:
            # Then the signatures of what is left, on the node's cores: one bad one refuses the lot.
            ids = {id(r) for r in good}
            checks = [c for r, c in zip(got.items, got.checks, strict=True) if id(r) in ids]
            bad = self.verifier(checks)
            if bad is not None:
                raise SignatureError(f"The signature of {checks[bad][0].short}… does not verify.")
        if refused:
            await self.refuse(link, *refused)
        if not good:
            return
        if stranger:
            # An invitee sending its join (e.g. again, after we restarted): welcomed as an
            # applicant, within the join attempts a peer and an invite may have under way.
            inv = decode_invite(good[0].body["token"], verify=False)
            self.gates.joins.expire(list(self.engines.values()), now)
            why = self.gates.joins.refusal(eng, link.remote, inv)
            if why is not None:
                await self.refuse(link, why)
                return
            self.gates.joins.start(eng, link.remote, inv, now)
        self.gates.records.charge(eng, good, now)
        await self.effects(eng, await eng.submit(good, now_ms()))

    async def on_proof(self, link: PeerLink, msg: m.Proof) -> None:
        eng = engine_for_peer(self.engines, link, msg.c)
        proof = EquivocationProof.decode(msg.proof, verify=False)
        refused = await self.gates.proofs.screen(eng, link.remote, proof)
        if refused is not None:
            await self.refuse(link, refused)
            return
        author = proof.verify()  # the signatures last
        await eng.store_proof(proof, now_ms())
        self.gates.proofs.stored(eng.cid, author)
        log.warning("equivocation by %s in %s", author, eng.text_id)

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
        task = self.spawn(self.stream_budgeted(link, eng, floor, since, their))
        self.streams[key] = task
        task.add_done_callback(lambda t: self.streams.pop(key, None) if self.streams.get(key) is t else None)

    async def stream_budgeted(self, link: PeerLink, eng: Engine, floor: int, since: int,
                              their: dict[tuple[bytes, int], int]) -> None:
        """`stream_gap` in one of the peer's stream slots, each message within its history budget."""
        async with self.gates.history.stream_slot(link.remote):
            await self.stream_gap(link, eng, floor, since, their, budgeted=True)

    async def _send_history(self, link: PeerLink, msg: m.Blocks, budgeted: bool) -> None:
        if budgeted:
            await asyncio.sleep(self.gates.history.spend(link.remote, sum(map(len, msg.blocks)), time.monotonic()))
        await self.send(link, msg)

    async def stream_gap(self, link: PeerLink, eng: Engine, floor: int, since: int,
                         their: dict[tuple[bytes, int], int], budgeted: bool = False) -> None:
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
                    await self._send_history(link, m.Blocks(eng.cid, chunk, max(0, total - sent)), budgeted)
                    chunk, size = [], 0
                    if link.closed:
                        return
                chunk.append(b.raw)
                size += len(b.raw)
                if len(chunk) == SYNC_BATCH:
                    sent += len(chunk)
                    await self._send_history(link, m.Blocks(eng.cid, chunk, max(0, total - sent)), budgeted)
                    chunk, size = [], 0
                    if link.closed:
                        return
        if chunk:
            await self._send_history(link, m.Blocks(eng.cid, chunk, 0), budgeted)

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
