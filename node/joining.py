"""Joining a constellation by invite, both sides: the invitee contacts its inviters and
starts following, a member welcomes (or refuses) an invitee's join request.

The welcome comes before the join record is taken: a joiner that cannot follow the
constellation (a plugin it lacks) refuses before it ever becomes a member.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import Any

from valuemesh.node.budgets import Budgets
from valuemesh.node.clock import now_ms
from valuemesh.node.engine import Engine
from valuemesh.node.gates import Gates, Refusal, invite_refusal
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, Send, Spawn
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import LocalError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.invite import Invite, decode_invite, parse_token
from valuemesh.protocol.records import Record, constellation_text, decode_record

log = logging.getLogger("valuemesh.daemon")  # the daemon's logger, as before the split: log filters keep working
JOIN_TIMEOUT_S = 15.0


class Joining:
    """Joins constellations by invite token, and answers invitees' join requests."""

    def __init__(self, identity: Identity, store: Store, engines: MutableMapping[bytes, Engine],
                 links: Mapping[MemberId, PeerLink], *, send: Send, spawn: Spawn,
                 connect: Callable[[str, int], Awaitable[PeerLink]],
                 new_engine: Callable[[Record], Engine],
                 forward: Callable[[Engine, list[Record]], Awaitable[None]],
                 first_sync: Callable[[Engine, PeerLink | None, MemberId], Coroutine[Any, Any, None]],
                 reached: Callable[[PeerLink, str, int], None] = lambda link, host, port: None,
                 gates: Gates | None = None) -> None:
        self.identity = identity
        self.store = store
        self.engines = engines
        self.links = links
        self.send = send
        self.spawn = spawn
        self.connect = connect
        self.new_engine = new_engine
        self.forward = forward
        self.first_sync = first_sync
        self.reached = reached  # told of an inviter's address that answered
        self.gates = gates if gates is not None else Gates(Budgets(), store.equivocation_count)
        self._waiters: dict[bytes, asyncio.Future[Record]] = {}
        self._welcomers: dict[bytes, PeerLink] = {}
        self._asked: dict[bytes, PeerLink] = {}  # the member each pending join was sent to

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.JoinRequest, self.on_join_request)
        handlers.add(m.JoinReply, self.on_join_reply)
        handlers.add(m.Refuse, self.on_refuse)

    # -- a member's side -----------------------------------------------------------
    async def on_join_request(self, link: PeerLink, msg: m.JoinRequest) -> None:
        # Everything cheap first (the invite's fields, expiry and uses, the record's shape, the
        # attempts under way), the two signatures last; every refusal costs the peer points.
        now = time.monotonic()
        joins = self.gates.joins
        joins.expire(list(self.engines.values()), now)
        refusal: Refusal | None = None
        eng: Engine | None = None
        try:
            inv = decode_invite(msg.token, verify=False)
            eng = self.engines.get(inv.constellation)
            if eng is None:
                raise RemoteError("This node does not follow that constellation.")
            record = decode_record(msg.record, verify=False)
            reason = None
            if record.author != link.remote:
                reason = "The join record is not signed by the connecting member."
            elif (record.type != "membership" or record.body.get("op") != "join"
                  or record.body.get("token") != msg.token or record.constellation != eng.cid):
                reason = "The join record does not carry this invite."
            else:
                reason = invite_refusal(eng, inv, link.remote, now_ms())
            if reason is not None:
                raise RemoteError(reason)
            refusal = joins.refusal(eng, link.remote, inv)
            if refusal is None:
                decode_invite(msg.token)
                decode_record(msg.record)
                eng.precheck(record)
        except RemoteError as exc:
            refusal = Refusal(exc.message, True)
        except ValuemeshError as exc:
            refusal = Refusal(exc.message, False)
        if refusal is not None or eng is None:
            refusal = refusal or Refusal("This node does not follow that constellation.", True)
            await self.send(link, m.Refuse(refusal.reason[:500]))
            link.penalize(PENALTY_INVALID if refusal.invalid else self.gates.budgets.over_budget_penalty,
                          refusal.reason)
            return
        # Welcome first, take the join record only once the joiner sends it back.
        joins.start(eng, link.remote, inv, now)
        await self.send(link, m.JoinReply(eng.cid, eng.genesis.raw))

    # -- the invitee's side --------------------------------------------------------
    async def on_join_reply(self, link: PeerLink, msg: m.JoinReply) -> None:
        fut = self._waiters.get(msg.c)
        if fut is not None and not fut.done() and self._asked.get(msg.c) is link:
            genesis = decode_record(msg.genesis)
            if genesis.constellation != msg.c or genesis.seq != 0 or genesis.type != "membership":
                raise RemoteError("The peer sent a genesis of another constellation.")
            self._welcomers[msg.c] = link
            fut.set_result(genesis)

    async def on_refuse(self, link: PeerLink, msg: m.Refuse) -> None:
        log.info("peer %s refused: %s", link.remote.short, msg.reason)
        for cid, fut in self._waiters.items():
            # Only the member we asked can refuse our join.
            if not fut.done() and self._asked.get(cid) is link:
                fut.set_exception(LocalError(f"The member refused the join: {msg.reason}"))

    async def join(self, token: str, name: str = "") -> dict[str, Any]:
        """Join by invite token as `name`; answers once the join record is stored and sent,
        before the first sync (a checkpoint can take a while for a large ledger)."""
        inv = parse_token(token)
        if now_ms() > inv.expires:
            raise LocalError("The invite token has expired; ask for a new one.")
        if inv.constellation in self.engines:
            raise LocalError(f"This node already follows {constellation_text(inv.constellation)}.")
        seq = await self.store.next_seq(inv.constellation, self.identity.member)
        body: dict[str, Any] = {"op": "join", "token": inv.raw()}
        if name:
            body["name"] = name[:64]
        record = Record.create(self.identity, type="membership", v=1, constellation=inv.constellation,
                               seq=seq, body=body, created=now_ms())
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._waiters[inv.constellation] = fut
        try:
            genesis = await self.contact_inviters(inv, record, fut)
        finally:
            self._waiters.pop(inv.constellation, None)
            self._asked.pop(inv.constellation, None)
        try:
            eng = self.new_engine(genesis)
        except ValuemeshError:
            self._welcomers.pop(inv.constellation, None)
            raise
        await eng.register(now_ms(), inv.tier, join=record)
        self.engines[eng.cid] = eng
        welcomer = self._welcomers.pop(inv.constellation, None)
        if welcomer is not None:
            await self.send(welcomer, m.SubmitRecords(eng.cid, [record.raw]))
        await self.forward(eng, [record])
        self.spawn(self.first_sync(eng, welcomer, inv.inviter))
        return {"id": eng.text_id, "name": eng.name, "record": record.id.hex(), "status": "pending"}

    async def contact_inviters(self, inv: Invite, record: Record, fut: asyncio.Future[Record]) -> Record:
        """Send the join request to the inviter at each of the invite's addresses in turn,
        until one welcomes us (the genesis), refuses, or the time is up."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        tried: list[str] = []
        for host, port in inv.addrs:
            link = self.links.get(inv.inviter)
            if link is None or link.closed:
                try:
                    link = await self.connect(host, port)
                except (ValuemeshError, OSError, TimeoutError):
                    tried.append(f"{host}:{port}")
                    continue
                with contextlib.suppress(ValuemeshError):
                    self.reached(link, host, port)
            self._asked[inv.constellation] = link
            await self.send(link, m.JoinRequest(inv.raw(), record.raw))
            try:
                return await asyncio.wait_for(asyncio.shield(fut), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                tried.append(f"{host}:{port}")
        if fut.done():
            return fut.result()
        raise LocalError(f"No member could be reached to join (tried {', '.join(tried) or 'no address'}).")
