"""Signing this node's own records: consecutive seqs, stored durably before any leaves the
process, many API requests per transaction (group commit), then proposed or forwarded.

Only this process signs our records (the store is locked to it), and only the Signer does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from valuemesh.node import trace
from valuemesh.node.clock import now_ms
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.held import Held
from valuemesh.node.messaging import Spawn
from valuemesh.node.store import Store
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.plugins import Registry
from valuemesh.protocol.records import Record

log = logging.getLogger("valuemesh.daemon")  # the daemon's logger, as before the split: log filters keep working

# One API request waiting to be signed: its engine, its (type, body) items, its answer.
_SubmitJob = tuple[Engine, list[tuple[str, dict[str, Any]]], "asyncio.Future[list[dict[str, Any]]]"]


class Signer:
    """Signs, stores and proposes the records the local API asks for."""

    def __init__(self, identity: Identity, registry: Registry, store: Store, engines: Mapping[bytes, Engine], *,
                 spawn: Spawn, effects: Callable[[Engine, Effects], Awaitable[None]],
                 forward: Callable[[Engine, list[Record]], Awaitable[None]], held: Held | None = None,
                 waiting: Callable[[bytes], str | None] = lambda cid: None) -> None:
        self.identity = identity
        self.registry = registry
        self.store = store
        self.engines = engines
        self.spawn = spawn
        self.effects = effects
        self.forward = forward  # hands records to core members while we are not core
        self._lock = asyncio.Lock()
        self._queue: list[_SubmitJob] = []
        self._drainer: asyncio.Task[None] | None = None
        # Per constellation: the engine and the seq after the last record of ours that
        # sign_and_store stored durably. While an engine exists only sign_and_store signs,
        # so the store is read once per engine rather than once per group of requests (a
        # query on the reader's thread, two thread hops, per group).
        self._own_next: dict[bytes, tuple[Engine, int]] = {}
        # The home's record of how far our seqs went (node/held.py), written behind the signer.
        self.held = held
        self.waiting = waiting  # why signing in a constellation must wait (node/seqcheck.py), or None
        self._saver: asyncio.Task[None] | None = None

    async def submit(self, eng: Engine, rtype: str, body: dict[str, Any]) -> dict[str, Any]:
        return (await self.submit_many(eng, [(rtype, body)]))[0]

    async def submit_many(self, eng: Engine, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        # The seqs are taken and the signed records stored in one transaction, under
        # one lock: a signed record never leaves this process before it is durable,
        # so a crash can neither reuse a seq that escaped nor leave a gap that
        # would hold back every later record of ours. Every record is checked before
        # any is stored (all or nothing per request); a refused one was never seen outside.
        # Requests queue up, and one task signs and stores every request queued so far in
        # one transaction (one fsync for all of them, a group commit): one record per
        # request no longer costs one fsync per record.
        job: _SubmitJob = (eng, items, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        if self._drainer is None or self._drainer.done():
            self._drainer = self.spawn(self.drain())
        # Shielded: a request whose client went away leaves its job to finish (or not) as
        # a whole, never half done.
        return await asyncio.shield(job[2])

    async def drain(self) -> None:
        """Sign and store every queued request at once, answer them, then propose; repeat
        while requests keep arriving (each pass takes only requests that exist)."""
        while self._queue:
            jobs, self._queue = self._queue, []
            try:
                async with self._lock:
                    stored = await self.sign_and_store(jobs)
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
                        await self.effects(eng, await eng.propose(fresh, now_ms()))
                    if not eng.is_core():
                        await self.forward(eng, recs)
                except ValuemeshError as exc:
                    # Stored and pending: the tick loop hands them on, a restart re-proposes them.
                    log.warning("could not propose new records in %s: %s", eng.text_id, exc.message)
                except Exception:
                    log.exception("internal error while proposing new records in %s", eng.text_id)

    async def first_seq(self, eng: Engine) -> int:
        """The seq our next record in `eng` takes: after everything of ours the store holds or the
        ledger made final, and never below what the home remembers (the store's floor).

        A floor above both means records we signed are missing here (the database was lost,
        emptied or restored): signing now would leave a gap, or reuse a seq if the floor is
        stale, so we refuse until catch-up from peers has brought those records back.
        """
        wait = self.waiting(eng.cid)
        if wait is not None:
            raise LocalError(wait)
        me = self.identity.member
        held, floor = await self.store.own_seq(eng.cid, me)
        base = max(held, eng.ledger.next_seq(me))
        if floor > base:
            raise LocalError(f"This member signed records up to seq {floor - 1} in {eng.text_id} that this "
                             f"node's database no longer holds (it holds those below {base}); it signs there "
                             f"again once catch-up from peers has brought them back.")
        return base

    def remember(self, cid: bytes, next_seq: int) -> None:
        """Note in the home's record that our seqs in `cid` reached `next_seq`, written soon after
        on a thread (a lag of one write: docs/storage.md, Sequence numbers)."""
        if self.held is None or not self.held.raise_to(cid, next_seq):
            return
        if self._saver is None or self._saver.done():
            self._saver = self.spawn(self._save_held())

    async def _save_held(self) -> None:
        held = self.held
        while held is not None and held.dirty:
            try:
                await asyncio.to_thread(held.save)
            except OSError as exc:
                log.warning("could not write %s: %s", held.path, exc.strerror or exc)
                return

    async def sign_and_store(self, jobs: list[_SubmitJob]) -> dict[bytes, tuple[list[Record], list[Record]]]:
        """Sign the queued requests with consecutive seqs and store them all in one durable
        transaction, then answer each. Returns, per constellation, the new records to
        propose and all records signed. A request that fails its checks is refused alone
        and its seqs go to the next one."""
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
                    next_seq[eng.cid] = max(known[1], eng.ledger.next_seq(self.identity.member)) \
                        if known is not None and known[0] is eng else await self.first_seq(eng)
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
                self.remember(cid, next_seq[cid])
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
