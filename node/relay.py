"""Relays without servers: circuits through a member's existing links (docs/transport.md §9).

`Relaying` is a Transport's half of the relay sub-protocol (protocol/circuit.py) in both
roles. As an **end** it reserves at relays and opens circuits through them; each circuit
is a `CircuitCarrier` over which the ordinary handshake runs end to end, so the relay
forwards ciphertext only. As a **relay** it keeps reservations (one per member, living as
long as the member's link), forwards circuits between two of its links when `may_relay`
allows both ends, and budgets what each end-to-end member sends through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from valuemesh.node.carrier import ControlHook
from valuemesh.node.link_limits import PeerUnreachableError, RelayRefusedError
from valuemesh.node.loglimit import LogLimiter
from valuemesh.node.ratelimit import TokenBucket
from valuemesh.protocol import circuit as cm
from valuemesh.protocol import wire
from valuemesh.protocol.circuit import Code, Op
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId

if TYPE_CHECKING:
    from valuemesh.node.link import PeerLink
    from valuemesh.node.transport import Transport

log = logging.getLogger("valuemesh.relay")

# Decides whether this node relays between two members (src opens, dst is the target;
# for a reservation both are the reserving member): True when both share a constellation
# with this node. None on a Transport means this node does not relay at all.
MayRelay = Callable[[MemberId, MemberId], bool]
Key = tuple["PeerLink", int]


class CircuitCarrier:
    """One end of a relayed circuit, as a Carrier: messages travel as CIRCUIT DATA on `link`.

    Sending waits for credit; the receiving side grants credit as its link consumes
    messages, so a slow reader here never stalls the relay link shared by other circuits.
    """

    addr: tuple[str, int] | None = None

    def __init__(self, relaying: Relaying, link: PeerLink, cid: int) -> None:
        self._r = relaying
        self.link = link
        self.cid = cid
        self._incoming: deque[bytes] = deque()
        self._arrived = asyncio.Event()
        self._credit = cm.INITIAL_WINDOW  # what we may still send
        self._credited = asyncio.Event()
        self._credited.set()
        self._allowed = cm.INITIAL_WINDOW  # what the other end may still send us
        self._consumed = 0
        self.reason: str | None = None

    def set_control(self, hook: ControlHook) -> None:
        """A circuit has no control messages of its own."""

    def local_addr(self) -> tuple[str, int] | None:
        """A circuit has no socket of its own."""
        return None

    async def send(self, data: bytes) -> None:
        while self._credit <= 0 and self.reason is None:
            self._credited.clear()
            await self._credited.wait()
        if self.reason is not None:
            raise ConnectionResetError(f"the circuit closed: {self.reason}")
        self._credit -= len(data)
        if not self.link._send_circuit(cm.data(self.cid, data)):
            raise ConnectionResetError("the link to the relay closed")

    async def receive(self, timeout: float | None) -> bytes | None:
        async with asyncio.timeout(timeout):
            while not self._incoming:
                if self.reason is not None:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
        data = self._incoming.popleft()
        self._consumed += len(data)
        if self._consumed >= cm.INITIAL_WINDOW // 2 and self.reason is None:
            self._allowed += self._consumed
            self.link._send_circuit(cm.credit(self.cid, self._consumed))
            self._consumed = 0
        return data

    def deliver(self, data: bytes) -> None:
        if self._allowed <= 0:
            self._r._drop(self, "the relay sent circuit data beyond the credit given")
            return
        self._allowed -= len(data)
        self._incoming.append(data)
        self._arrived.set()

    def add_credit(self, amount: int) -> None:
        self._credit += amount
        self._credited.set()

    def ended(self, reason: str) -> None:
        """The circuit is gone (closed by the far side, the relay, or the relay link)."""
        if self.reason is None:
            self.reason = reason
            # What we queued for it and have not written would only be dropped at the relay.
            self.link._drop_circuit_data(self.cid)
        self._arrived.set()
        self._credited.set()

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if self.reason is None:
            self.ended("closed by this end")
            self.link._send_circuit(cm.close(self.cid, "closed by the end"))
        self._r._ends.pop((self.link, self.cid), None)


@dataclass(slots=True, eq=False)
class _Circuit:
    """A circuit this node relays: hop a (the opener's link) and hop b (the target's)."""

    a: PeerLink
    a_cid: int
    b: PeerLink
    b_cid: int
    open: bool = False
    # DATA bytes each direction may still carry, by the receiving end's credit.
    window_ab: int = cm.INITIAL_WINDOW
    window_ba: int = cm.INITIAL_WINDOW

    def other(self, link: PeerLink) -> tuple[PeerLink, int]:
        return (self.b, self.b_cid) if link is self.a else (self.a, self.a_cid)


@dataclass(slots=True)
class _Budget:
    """What one end-to-end member may send through this relay."""

    messages: TokenBucket
    bytes: TokenBucket
    over_since: float | None = None
    cooldown_until: float = 0.0
    circuits: set[_Circuit] = field(default_factory=set)


class Relaying:
    """Both roles of the relay sub-protocol for one Transport."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        self._lim = transport.limits.relay
        self.may_relay: MayRelay | None = None
        # Relay role.
        self._reservations: dict[MemberId, PeerLink] = {}
        self._hops: dict[Key, _Circuit] = {}
        self._budgets: dict[MemberId, _Budget] = {}
        # End role.
        self._ends: dict[Key, CircuitCarrier] = {}
        self._opening: dict[Key, asyncio.Future[cm.Message]] = {}
        self._reserving: dict[PeerLink, asyncio.Future[cm.Message]] = {}
        self._reserved_at: dict[MemberId, PeerLink] = {}
        self._pending = 0
        self._next: dict[PeerLink, int] = {}
        self._logs: dict[str, LogLimiter] = {}
        # How often a member's link was paused for its relay budget (relay role).
        self.throttled = 0

    # -- views ---------------------------------------------------------------

    @property
    def reservations(self) -> list[MemberId]:
        """The relays that currently keep this node reachable."""
        return [m for m, lk in self._reserved_at.items() if not lk.closed]

    @property
    def relayed_for(self) -> list[MemberId]:
        """The members holding a reservation at this node."""
        return [m for m, lk in self._reservations.items() if not lk.closed]

    @property
    def circuits(self) -> int:
        """Circuits this node relays now."""
        return len(self._hops) // 2

    def _say(self, kind: str, msg: str, *args: object) -> None:
        # What others can make us log: one line per interval for each kind (and reason).
        limiter = self._logs.get(kind)
        if limiter is None:
            limiter = self._logs[kind] = LogLimiter(log)
        limiter.log(logging.INFO, msg, *args)

    # -- end role: reserve, dial, accept ------------------------------------

    async def reserve(self, link: PeerLink) -> None:
        """Ask the relay at the other end of `link` to keep this node reachable through it."""
        if link.closed:
            raise PeerUnreachableError(f"The link to {link.remote.short}… is closed.")
        if link in self._reserving:
            raise LocalError("A reservation at this relay is already being asked for.")
        fut: asyncio.Future[cm.Message] = asyncio.get_running_loop().create_future()
        self._reserving[link] = fut
        try:
            link._send_circuit(cm.reserve())
            async with asyncio.timeout(self._t.limits.connect_timeout):
                answer = await fut
        except TimeoutError:
            raise PeerUnreachableError(f"The relay {link.remote.short}… did not answer the reservation.") from None
        finally:
            self._reserving.pop(link, None)
        if answer.code is not Code.OK:
            raise RelayRefusedError(f"Reservation at {link.remote.short}… refused: {answer.reason}", answer.code)
        self._reserved_at[link.remote] = link
        log.info("reserved at relay %s", link.remote.short)

    def release(self, relay: MemberId) -> None:
        """Give up the reservation at `relay` (this node became reachable without it)."""
        link = self._reserved_at.pop(relay, None)
        if link is not None and not link.closed:
            link._send_circuit(cm.release())
            log.info("released the reservation at relay %s", relay.short)

    def _cid(self, link: PeerLink) -> int:
        # Our side's bit: 0 if we initiated the link's handshake, else the responder bit.
        side = cm.RESPONDER_BIT if link.inbound else 0
        for _ in range(1 << 16):
            n = self._next.get(link, 0) % cm.RESPONDER_BIT + 1
            self._next[link] = n
            cid = side | n
            if (link, cid) not in self._ends and (link, cid) not in self._hops:
                return cid
        raise LocalError("No free circuit id on this link.")

    async def dial_via(self, relay: MemberId, target: MemberId) -> PeerLink:
        """Open a circuit to `target` through `relay` and run the handshake inside it."""
        t = self._t
        live = t.link(target)
        if live is not None and not live.closed:
            return live
        link = t.link(relay)
        if link is None or link.closed:
            raise PeerUnreachableError(f"This node has no live link to the relay {relay.short}….")
        cid = self._cid(link)
        carrier = CircuitCarrier(self, link, cid)
        self._ends[(link, cid)] = carrier
        fut: asyncio.Future[cm.Message] = asyncio.get_running_loop().create_future()
        self._opening[(link, cid)] = fut
        try:
            link._send_circuit(cm.open_(cid, target))
            async with asyncio.timeout(t.limits.connect_timeout):
                answer = await fut
        except TimeoutError:
            carrier.abort()
            raise PeerUnreachableError(f"The relay {relay.short}… did not answer the circuit open.") from None
        except BaseException:
            carrier.abort()
            raise
        finally:
            self._opening.pop((link, cid), None)
        if answer.code is not Code.OK:
            self._ends.pop((link, cid), None)
            raise RelayRefusedError(
                f"The circuit to {target.short}… through {relay.short}… was refused: {answer.reason}",
                answer.code,
            )
        where = f"{target.short}… via {relay.short}…"
        return await t._adopt(carrier, where, initiator=True, expect=target, path="relayed", via=relay)

    def _incoming(self, link: PeerLink, cid: int, src: MemberId) -> None:
        t = self._t
        code = Code.OK
        if link.remote not in self._reserved_at or self._reserved_at[link.remote] is not link:
            code = Code.NO_RESERVATION
        elif t.banned_for(src) or not _authorised(t, src):
            code = Code.REFUSED
        elif self._pending >= self._lim.max_pending:
            code = Code.BUSY
        if code is not Code.OK:
            self._say(f"incoming {code.name}", "refused a circuit from %s via %s: %s",
                      src.short, link.remote.short, code.sentence)
            link._send_circuit(cm.opened(cid, code))
            return
        carrier = CircuitCarrier(self, link, cid)
        self._ends[(link, cid)] = carrier
        link._send_circuit(cm.opened(cid, Code.OK))
        self._pending += 1
        t._spawn(self._answer(carrier, src))

    async def _answer(self, carrier: CircuitCarrier, src: MemberId) -> None:
        relay = carrier.link.remote
        try:
            await self._t._adopt(
                carrier, f"{src.short}… via {relay.short}…", initiator=False, expect=src,
                path="relayed", via=relay,
            )
        except Exception as e:
            self._say("answer", "relayed handshake from %s via %s failed: %s", src.short, relay.short, e)
        finally:
            self._pending -= 1

    def _drop(self, carrier: CircuitCarrier, reason: str) -> None:
        self._say("drop", "closing circuit %d via %s: %s", carrier.cid, carrier.link.remote.short, reason)
        carrier.ended(reason)
        carrier.abort()

    # -- dispatch ------------------------------------------------------------

    async def on_frame(self, link: PeerLink, body: bytes) -> None:
        """One CIRCUIT frame from `link`; raises cm.CircuitError on a malformed one."""
        lim = self._t.limits
        msg = cm.decode(body, lim.max_payload + wire.FRAME_OVERHEAD)
        key = (link, msg.circuit)
        op = msg.op
        if op in (Op.OPEN, Op.INCOMING):
            peer_side = 0 if link.inbound else cm.RESPONDER_BIT
            if msg.circuit & cm.RESPONDER_BIT != peer_side:
                raise cm.CircuitError("The peer opened a circuit with an id of this node's side.")
            if key in self._ends or key in self._hops:
                raise cm.CircuitError("The peer opened a circuit with an id already in use.")
        if op is Op.INCOMING:
            self._incoming(link, msg.circuit, msg.member)
            return
        if op is Op.RESERVED:
            fut = self._reserving.get(link)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if op is Op.RELEASE:  # costs nothing to charge: it only frees what the member held
            if self._reservations.get(link.remote) is link:
                del self._reservations[link.remote]
                log.info("released the relay reservation of %s at its request", link.remote.short)
            return
        end = self._ends.get(key)
        if end is not None:
            self._at_end(end, key, msg)
            return
        # Everything else is this node's relay role, budgeted per sending member. What it
        # drops (a circuit that ended or never was) costs no budget: the link's own rate
        # limit bounds it, and a member's backlog for a circuit we closed drains at once.
        if op not in (Op.RESERVE, Op.OPEN) and key not in self._hops:
            if op is Op.DATA:
                self._say("unknown", "dropped circuit data from %s for unknown circuit %d",
                          link.remote.short, msg.circuit)
            return
        await self._charge(link, len(body))
        if link.closed:
            return
        if op is Op.RESERVE:
            self._reserve(link)
        elif op is Op.OPEN:
            self._open(link, msg.circuit, msg.member)
        elif key in self._hops:
            self._forward(self._hops[key], link, msg)

    def _at_end(self, end: CircuitCarrier, key: Key, msg: cm.Message) -> None:
        if msg.op is Op.DATA:
            end.deliver(msg.rest)
        elif msg.op is Op.CREDIT:
            end.add_credit(msg.credit)
        elif msg.op is Op.OPENED:
            fut = self._opening.get(key)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif msg.op is Op.CLOSE:
            end.ended(f"closed through the relay: {msg.reason or 'no reason given'}")
            self._ends.pop(key, None)
            fut = self._opening.get(key)
            if fut is not None and not fut.done():
                fut.set_result(cm.Message(Op.OPENED, msg.circuit, bytes((Code.UNREACHABLE,)) + msg.rest))

    # -- relay role ----------------------------------------------------------

    def _budget(self, member: MemberId) -> _Budget:
        b = self._budgets.get(member)
        if b is None:
            now = self._t.clock()
            lim = self._lim
            b = _Budget(TokenBucket(lim.rate_messages, lim.burst_messages, now),
                        TokenBucket(lim.rate_bytes, lim.burst_bytes, now))
            self._budgets[member] = b
        return b

    async def _charge(self, link: PeerLink, size: int) -> None:
        member = link.remote
        b = self._budget(member)
        now = self._t.clock()
        msg_wait = b.messages.charge(1, now)
        wait = max(msg_wait, b.bytes.charge(size, now))
        # Only a sustained *message* rate counts as flooding: a bulk transfer over the byte
        # budget is slowed (and credit makes its sender wait), never cut off.
        if msg_wait <= 0:
            b.over_since = None
        elif b.over_since is None:
            b.over_since = now
        elif now - b.over_since >= self._lim.over_budget_grace and b.cooldown_until <= now:
            b.over_since = None
            b.cooldown_until = now + self._lim.cooldown
            log.warning("relay budget of %s spent for %.1f s: closing its %d circuit(s), refusing new ones for %.0f s",
                        member.short, self._lim.over_budget_grace, len(b.circuits), self._lim.cooldown)
            for c in list(b.circuits):
                self._end_circuit(c, "over the relay's message budget for a member of this circuit")
        if wait > 0:
            # The throttle: this member's link is not read meanwhile (its bytes, nobody else's).
            self.throttled += 1
            await asyncio.sleep(min(wait, 1.0))

    def _reserve(self, link: PeerLink) -> None:
        src = link.remote
        code = Code.OK
        if self.may_relay is None:
            code = Code.NOT_A_RELAY
        elif not self._may(src, src):
            code = Code.NOT_AUTHORISED
        elif src not in self._reservations and len(self._reservations) >= self._lim.max_reservations:
            code = Code.BUSY
        if code is Code.OK:
            self._reservations[src] = link
            log.info("holding a relay reservation for %s", src.short)
        else:
            self._say(f"reserve {code.name}", "refused a relay reservation for %s: %s", src.short, code.sentence)
        link._send_circuit(cm.reserved(code))

    def _may(self, src: MemberId, dst: MemberId) -> bool:
        if self.may_relay is None:
            return False
        try:
            return bool(self.may_relay(src, dst))
        except Exception:
            log.exception("may_relay() failed for %s -> %s", src.short, dst.short)
            return False

    def _open(self, link: PeerLink, cid: int, dst: MemberId) -> None:
        src = link.remote
        lim = self._lim
        target = self._reservations.get(dst)
        code = Code.OK
        if self.may_relay is None:
            code = Code.NOT_A_RELAY
        elif dst in (src, self._t.member) or not self._may(src, dst):
            code = Code.NOT_AUTHORISED
        elif self._budget(src).cooldown_until > self._t.clock():
            code = Code.OVER_BUDGET
        elif target is None or target.closed:
            code = Code.NO_RESERVATION
        elif (
            self.circuits >= lim.max_circuits
            or len(self._budget(src).circuits) >= lim.max_circuits_per_member
            or len(self._budget(dst).circuits) >= lim.max_circuits_per_member
        ):
            code = Code.BUSY
        if code is not Code.OK or target is None:
            self._say(f"open {code.name}", "refused a circuit from %s to %s: %s", src.short, dst.short, code.sentence)
            link._send_circuit(cm.opened(cid, code))
            return
        c = _Circuit(link, cid, target, self._cid(target))
        self._hops[(link, cid)] = c
        self._hops[(target, c.b_cid)] = c
        self._budget(src).circuits.add(c)
        self._budget(dst).circuits.add(c)
        target._send_circuit(cm.incoming(c.b_cid, src))

    def _forward(self, c: _Circuit, link: PeerLink, msg: cm.Message) -> None:
        out, out_cid = c.other(link)
        if msg.op is Op.OPENED:
            if link is not c.b or c.open:
                raise cm.CircuitError("The peer answered a circuit it did not receive.")
            out._send_circuit(cm.opened(out_cid, msg.code, msg.reason))
            if msg.code is Code.OK:
                c.open = True
            else:
                self._remove(c)
            return
        if msg.op is Op.CLOSE:
            self._remove(c)
            out._send_circuit(cm.close(out_cid, msg.reason))
            return
        if not c.open:
            raise cm.CircuitError("The peer used a circuit before it was open.")
        a_to_b = link is c.a
        if msg.op is Op.CREDIT:
            # Credit from one end widens what the other end may send.
            if a_to_b:
                c.window_ba += msg.credit
            else:
                c.window_ab += msg.credit
            out._send_circuit(cm.credit(out_cid, msg.credit))
            return
        if msg.op is not Op.DATA:
            raise cm.CircuitError("The peer sent a circuit message that makes no sense here.")
        window = c.window_ab if a_to_b else c.window_ba
        if window <= 0:
            self._end_circuit(c, "an end sent circuit data beyond the credit it was given")
            return
        if a_to_b:
            c.window_ab -= len(msg.rest)
        else:
            c.window_ba -= len(msg.rest)
        if out.circuit_bytes > self._lim.max_backlog:
            self._end_circuit(c, "the far end did not keep up with relayed data")
            return
        out._send_circuit(cm.data(out_cid, msg.rest))

    def _end_circuit(self, c: _Circuit, reason: str) -> None:
        self._remove(c)
        c.a._send_circuit(cm.close(c.a_cid, reason))
        c.b._send_circuit(cm.close(c.b_cid, reason))

    def _remove(self, c: _Circuit) -> None:
        self._hops.pop((c.a, c.a_cid), None)
        self._hops.pop((c.b, c.b_cid), None)
        for m in (c.a.remote, c.b.remote):
            b = self._budgets.get(m)
            if b is not None:
                b.circuits.discard(c)

    # -- a link went down ----------------------------------------------------

    def link_closed(self, link: PeerLink) -> None:
        """End everything that ran over `link`, at once, in both roles."""
        if self._reservations.get(link.remote) is link:
            del self._reservations[link.remote]
        if self._reserved_at.get(link.remote) is link:
            del self._reserved_at[link.remote]
            log.info("lost the reservation at relay %s", link.remote.short)
        self._next.pop(link, None)
        fut = self._reserving.get(link)
        if fut is not None and not fut.done():
            fut.set_result(cm.Message(Op.RESERVED, 0, bytes((Code.UNREACHABLE,))))
        for key in [k for k in self._ends if k[0] is link]:
            end = self._ends.pop(key)
            end.ended(f"the link to the relay {link.remote.short}… closed")
            opening = self._opening.get(key)
            if opening is not None and not opening.done():
                opening.set_result(cm.Message(Op.OPENED, key[1], bytes((Code.UNREACHABLE,))))
        for key in [k for k in self._hops if k[0] is link]:
            c = self._hops.get(key)
            if c is None:
                continue
            self._remove(c)
            out, out_cid = c.other(link)
            out._send_circuit(cm.close(out_cid, f"the relay lost its link to {link.remote.short}…"))
        self._prune()

    def _prune(self) -> None:
        now = self._t.clock()
        for m, b in list(self._budgets.items()):
            if not b.circuits and b.cooldown_until <= now and m not in self._reservations:
                del self._budgets[m]


def _authorised(t: Transport, src: MemberId) -> bool:
    try:
        return bool(t.handler.authorize(src, True))
    except Exception:
        log.exception("authorize() failed for %s", src)
        return False
