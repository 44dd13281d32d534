"""After any doubt about its own database, a node asks its peers for the last record it signed
before it signs again, so its sequence counter can never go backwards (docs/storage.md,
Sequence numbers; #16 item 5).

Doubt is what `open_home_store` found (node/held.py): the operator started with `--recover`,
the home kept no record of how far its seqs went, or the database holds less than that record.
Then, per constellation in doubt, the node asks the members it is linked to for the highest-seq
record of its own they hold (final or pending). An answer is a record *we* signed, so a peer
cannot make us skip seqs by lying about a number; it can only withhold. Signing in that
constellation waits until all but f of the other core members have answered (f = the faults
the committee tolerates), so a record of ours that reached enough of them to matter is seen;
records of ours we no longer held come back into the store as pending and become final.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, MutableMapping

from valuemesh.node.clock import now_ms
from valuemesh.node.engine import Engine
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, Send
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import Record, decode_record

log = logging.getLogger("valuemesh.daemon")
ASK_EVERY_S = 5.0  # how often an unanswered peer is asked again
MAX_ASKS_PER_LINK_S = 1.0  # answers given to one peer per constellation per this many seconds


class SeqCheck:
    """Per constellation in doubt: who answered, the highest record of ours they hold."""

    def __init__(self, identity: Identity, store: Store, engines: Mapping[bytes, Engine],
                 links: Mapping[MemberId, PeerLink], *, send: Send, doubt: set[bytes]) -> None:
        self.identity = identity
        self.store = store
        self.engines = engines
        self.links = links
        self.send = send
        self._doubt = set(doubt)
        self._answered: dict[bytes, set[MemberId]] = {c: set() for c in doubt}
        self._asked: dict[tuple[bytes, MemberId], float] = {}
        self._served: MutableMapping[tuple[bytes, MemberId], float] = {}

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.MySeq, self.on_ask)
        handlers.add(m.YourSeq, self.on_answer)

    # -- our side ---------------------------------------------------------------------------
    def waiting(self, cid: bytes) -> str | None:
        """Why signing in `cid` must wait (one sentence), or None when it need not."""
        if cid not in self._doubt:
            return None
        eng = self.engines.get(cid)
        if eng is None:
            return None
        committee = eng.current_committee()
        me = self.identity.member
        # By weight: all but the f the committee tolerates, ourselves not counted.
        need = max(0, committee.total - committee.weight(me) - committee.f)
        got = sum(committee.weight(mid) for mid in self._answered[cid] if mid != me)
        if got >= need:
            self._doubt.discard(cid)
            log.info("own seq in %s confirmed by peers' answers (weight %d of %d needed)", eng.text_id, got, need)
            return None
        return (f"This node is confirming with its peers how far it signed in {eng.text_id} after a recovery "
                f"({got} of the {need} answers it needs); it signs again once they answered.")

    async def tick(self) -> None:
        """Ask every linked member of a constellation in doubt that has not answered yet."""
        now = time.monotonic()
        for cid in list(self._doubt):
            eng = self.engines.get(cid)
            if eng is None or self.waiting(cid) is None:
                continue
            for mid, link in list(self.links.items()):
                if mid in self._answered[cid] or not eng.may_receive(mid):
                    continue
                if now - self._asked.get((cid, mid), -ASK_EVERY_S) >= ASK_EVERY_S:
                    self._asked[(cid, mid)] = now
                    await self.send(link, m.MySeq(cid))

    async def on_answer(self, link: PeerLink, msg: m.YourSeq) -> None:
        cid = msg.c
        if cid not in self._answered or (cid, link.remote) not in self._asked:
            return  # not asked: nothing to learn, nothing to punish (a late answer after a restart)
        eng = self.engines.get(cid)
        if eng is None:
            return
        if msg.record:
            try:
                rec = decode_record(msg.record)
                if rec.author != self.identity.member or rec.constellation != cid:
                    raise ValueError
            except (ValuemeshError, ValueError):
                log.info("%s answered with a record that is not ours in %s; ignored", link.remote.short,
                         eng.text_id)
                link.penalize(PENALTY_INVALID, "a record that is not the asker's own")
                return
            await self._take_back(eng, rec)
        self._answered[cid].add(link.remote)

    async def _take_back(self, eng: Engine, rec: Record) -> None:
        me = self.identity.member
        if rec.seq + 1 > await self.store.next_seq(eng.cid, me):
            await self.store.raise_seq_floor(eng.cid, me, rec.seq + 1)
        if await self.store.get_record(rec.id) is None and rec.seq >= eng.ledger.next_seq(me):
            # Ours, lost here, not yet final: pending again, so it becomes final.
            new = await eng.store_pending([rec], now_ms())
            if new:
                log.info("took back own record seq %d in %s from a peer", rec.seq, eng.text_id)

    # -- a peer's side ----------------------------------------------------------------------
    async def on_ask(self, link: PeerLink, msg: m.MySeq) -> None:
        eng = self.engines.get(msg.c)
        if eng is None or not eng.may_receive(link.remote):
            return  # a stranger learns nothing, not even whether we follow it
        key = (msg.c, link.remote)
        now = time.monotonic()
        if now - self._served.get(key, -MAX_ASKS_PER_LINK_S) < MAX_ASKS_PER_LINK_S:
            link.penalize(1, "asking for its own seq too often")
            return
        self._served[key] = now
        if len(self._served) > 4096:
            self._served.clear()
        rec = await self.store.latest_record(msg.c, link.remote)
        await self.send(link, m.YourSeq(msg.c, rec.encode() if rec is not None else b""))
