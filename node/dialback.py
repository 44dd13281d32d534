"""Dial-back (as libp2p's AutoNAT): a node asks a few linked members to dial the addresses it
announces and learns which reach it from outside; and it answers such requests, dialing only
the IP the asker's link comes from, so nobody can aim it at a third party (docs/protocol.md §9.2).

The dial is the first half of the wire handshake on the asker's `/vm/peer`, expecting the
asker's key: its signature over a transcript that covers our fresh ephemeral key proves the
address reaches the asker's node, not merely something that answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from valuemesh.node.addresses import Address, address_range
from valuemesh.node.budgets import OVER_BUDGET_PENALTY, ByteWindows
from valuemesh.node.link import PeerLink
from valuemesh.node.loglimit import LogKinds
from valuemesh.node.messaging import Handlers, Send, Spawn
from valuemesh.node.transport import PEER_PATH
from valuemesh.protocol import messages as m
from valuemesh.protocol import wire
from valuemesh.protocol.errors import ValidationError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId

log = logging.getLogger("valuemesh.discovery")

DIALBACK_PEERS = 3  # members asked at once, in different address ranges where possible
DIAL_TIMEOUT_S = 3.0  # one dial-back dial, connect to signed response
ANSWER_TIMEOUT_S = 10.0  # how long the asker waits for the answers
# Requests one asker may make of us: a burst, then one per interval (each costs us up to
# four dials, and the asker's transport scores our half-handshakes as abandoned ones).
DIALBACK_BURST = 2
DIALBACK_INTERVAL_S = 30.0
RECHECK_S = 600.0  # ask again this often, or at once when our addresses change

REACHABLE, UNREACHABLE, UNKNOWN, REFUSED = "reachable", "unreachable", "unknown", "refused"

Groups = Callable[[MemberId], Collection[bytes]]


@dataclass(frozen=True, slots=True)
class Seen:
    """One helper's view of our link to it: the address it saw us at; the helper's IP as we
    see it (None for a relayed link); our end of the connection when this end opened it
    (PeerLink.opened_from; None when the helper dialled us, so its view shows no NAT's doing)."""

    observed: Address
    remote_ip: str | None
    opened_from: tuple[str, int] | None


@dataclass(slots=True)
class Reachability:
    """What dial-back found out, for `status` and `valuemesh netcheck`: per announced address
    reachable / unreachable / unknown, the addresses peers see our links come from, who was
    asked and when (wall ms; None: never)."""

    results: dict[Address, str] = field(default_factory=dict)
    observed: dict[MemberId, Address] = field(default_factory=dict)
    helpers: tuple[MemberId, ...] = ()
    checked_at: int | None = None
    seen: dict[MemberId, Seen] = field(default_factory=dict)  # the observations with their links

    def to_json(self) -> dict[str, object]:
        return {
            "addresses": {str(a): r for a, r in sorted(self.results.items())},
            "observed": sorted({str(a) for a in self.observed.values()}),
            "asked": [str(h) for h in self.helpers],
            "checked_at": self.checked_at,
        }


def merge(asked: Sequence[Address], answers: Sequence[Mapping[Address, str]]) -> dict[Address, str]:
    """Reachable if any helper reached it, unreachable if a helper dialed and none reached it,
    unknown if nobody dialed it (refused, no answer)."""
    out = {}
    for a in asked:
        said = {ans.get(a) for ans in answers}
        out[a] = REACHABLE if REACHABLE in said else UNREACHABLE if UNREACHABLE in said else UNKNOWN
    return out


def plain_ip(host: str) -> str | None:
    """The IP literal `host` names, with an IPv4-mapped IPv6 address as its IPv4 form."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.compressed
    return ip.compressed


async def probe(
    session: aiohttp.ClientSession, identity: Identity, network_id: bytes, address: Address, expect: MemberId,
    *, timeout: float = DIAL_TIMEOUT_S, random_bytes: Callable[[int], bytes] = os.urandom,
) -> bool:
    """True if the node at `address` proves it holds `expect`'s key (HELLO, RESPONSE), then hang up."""
    url = URL.build(scheme="http", host=address.host, port=address.port, path=PEER_PATH)
    try:
        async with asyncio.timeout(timeout), session.ws_connect(
            url, autoping=False, heartbeat=None, compress=0, max_msg_size=4096
        ) as ws:
            side = wire.Initiator(identity, network_id, random_bytes(32))
            await ws.send_bytes(side.start())
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                return False
            return side.read_response(msg.data) == expect
    except (TimeoutError, aiohttp.ClientError, OSError, ValuemeshError):
        return False


_running: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


class DialBack:
    """Asks for and answers dial-backs. `state` is the latest `Reachability`."""

    def __init__(
        self, identity: Identity, network_id: bytes, links: Mapping[MemberId, PeerLink], *, send: Send,
        groups: Groups, addresses: Callable[[], Sequence[Address]],
        on_result: Callable[[dict[Address, str]], None] = lambda r: None,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], int] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom, dial_timeout: float = DIAL_TIMEOUT_S,
        spawn: Spawn | None = None,
    ) -> None:
        self._spawn = spawn or _spawn
        self.identity = identity
        self.network_id = network_id
        self._links = links
        self._send = send
        self._groups = groups
        self._addresses = addresses
        self._on_result = on_result
        self._clock = clock
        self._wall = wall or (lambda: int(time.time() * 1000))
        self._random = random_bytes
        self._dial_timeout = dial_timeout
        self.state = Reachability()
        self._waiting: dict[bytes, tuple[MemberId, tuple[Address, ...], asyncio.Future[dict[Address, str]]]] = {}
        self._budget = ByteWindows(1.0 / DIALBACK_INTERVAL_S, DIALBACK_BURST)
        self._session: aiohttp.ClientSession | None = None
        self._asking = False
        self._asked_for: tuple[Address, ...] = ()
        self._asked_at: float | None = None
        self._log = LogKinds(log).log

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.DialBackAsk, self._on_ask)
        handlers.add(m.DialBackReply, self._on_reply)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- asking --------------------------------------------------------------------------------

    @property
    def asking(self) -> bool:
        """Whether a round of asking is under way."""
        return self._asking

    @property
    def can_ask(self) -> bool:
        """Whether a round could start now: none under way, and a linked member to ask."""
        return not self._asking and bool(self._helpers())

    def due(self) -> bool:
        """Whether to ask now: never asked, our addresses changed, or RECHECK_S passed."""
        if not self.can_ask:
            return False
        now = self._clock()
        return (self._asked_at is None or tuple(self._addresses()) != self._asked_for
                or now - self._asked_at >= RECHECK_S)

    def _helpers(self) -> list[PeerLink]:
        """Up to DIALBACK_PEERS linked members, each from another address range first."""
        links = [lk for k, lk in sorted(self._links.items(), key=lambda kv: kv[0].key)
                 if not lk.closed and self._groups(k)]
        picked: list[PeerLink] = []
        ranges: set[str] = set()
        for lk in links:
            rng = address_range(lk.addr[0])
            if rng not in ranges:
                ranges.add(rng)
                picked.append(lk)
        picked += [lk for lk in links if lk not in picked]
        return picked[:DIALBACK_PEERS]

    async def ask(self) -> Reachability:
        """Ask up to DIALBACK_PEERS linked members to dial our addresses back; wait for the
        answers (at most ANSWER_TIMEOUT_S) and return the merged verdict."""
        self._asking = True
        try:
            asked = tuple(self._addresses())[:m.MAX_DIALBACK_ADDRESSES]
            self._asked_for, self._asked_at = asked, self._clock()
            helpers = self._helpers()
            pending: list[asyncio.Future[dict[Address, str]]] = []
            loop = asyncio.get_running_loop()
            for lk in helpers:
                seen = self.state.observed.get(lk.remote)
                # Once a helper told us the IP it sees, ask it only about addresses at that IP.
                mine = [a for a in asked if seen is None or plain_ip(a.host) == plain_ip(seen.host)]
                if not mine:
                    continue
                nonce = self._random(m.DIALBACK_NONCE_LEN)
                fut: asyncio.Future[dict[Address, str]] = loop.create_future()
                self._waiting[nonce] = (lk.remote, tuple(mine), fut)
                pending.append(fut)
                await self._send(lk, m.DialBackAsk(nonce, [[a.host, a.port] for a in mine]))
            answers: list[dict[Address, str]] = []
            if pending:
                done, _ = await asyncio.wait(pending, timeout=ANSWER_TIMEOUT_S)
                answers = [f.result() for f in done if not f.cancelled() and f.exception() is None]
            for nonce in [n for n, (_, _, f) in self._waiting.items() if f in pending]:
                del self._waiting[nonce]
            results = merge(asked, answers)
            self.state = Reachability(results, self.state.observed, tuple(lk.remote for lk in helpers),
                                      self._wall(), self.state.seen)
            self._on_result(results)
            return self.state
        finally:
            self._asking = False

    async def _on_reply(self, link: PeerLink, msg: m.DialBackReply) -> None:
        waiting = self._waiting.get(msg.nonce)
        if waiting is None or waiting[0] != link.remote or waiting[2].done():
            self._log("unasked", "ignored a dial-back answer from %s that answers nothing we asked it",
                      link.remote.short)
            return
        _, asked, fut = waiting
        answer = {}
        for host, port, result in msg.results:
            with contextlib.suppress(ValidationError):
                a = Address(host, port)
                if a in asked and result in (REACHABLE, UNREACHABLE):
                    answer[a] = result
        with contextlib.suppress(ValidationError):
            seen = Address(msg.observed[0], msg.observed[1])
            self.state.observed[link.remote] = seen
            self.state.seen[link.remote] = Seen(seen, link.ip, link.opened_from)
        fut.set_result(answer)

    # -- answering -----------------------------------------------------------------------------

    async def _on_ask(self, link: PeerLink, msg: m.DialBackAsk) -> None:
        # The dials take seconds: answer in a task of its own, not holding up the link's messages.
        self._spawn(self._answer(link, msg))

    async def _answer(self, link: PeerLink, msg: m.DialBackAsk) -> None:
        asker = link.remote
        now = self._clock()
        host, port = link.addr
        observed = [host, port] if 0 < port < 65536 and 0 < len(host) <= 45 else ["0.0.0.0", 1]
        if not self._groups(asker):
            self._log("stranger", "refused a dial-back request from %s: it shares no constellation with us",
                      asker.short)
            link.penalize(OVER_BUDGET_PENALTY, "It asked for a dial-back without sharing a constellation.")
            await self._send(link, m.DialBackReply(msg.nonce, [], observed))
            return
        if self._budget.room(asker, now) < 1:
            self._log("budget", "refused a dial-back request from %s: at most one per %.0f s is answered",
                      asker.short, DIALBACK_INTERVAL_S)
            link.penalize(OVER_BUDGET_PENALTY, "It asked for dial-backs too often.")
            await self._send(link, m.DialBackReply(msg.nonce, [], observed))
            return
        self._budget.spend(asker, 1, now)
        seen = plain_ip(host)
        targets: list[Address] = []
        results: list[list[object]] = []
        for h, p in msg.addrs:
            ip = plain_ip(h)
            if ip is None or ip != seen:
                results.append([h, p, REFUSED])
                continue
            try:
                targets.append(Address(ip, p))
            except ValidationError:
                results.append([h, p, REFUSED])
        if not targets:
            # Only addresses at other IPs: someone else's, as far as we can tell. Never dialed.
            self._log("third party", "refused a dial-back request from %s: it named only addresses at other IPs "
                      "than the %s its link comes from", asker.short, seen)
            link.penalize(OVER_BUDGET_PENALTY, "It asked for a dial-back of addresses that are not its own.")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        session = self._session
        reached = await asyncio.gather(*(
            probe(session, self.identity, self.network_id, a, asker, timeout=self._dial_timeout,
                  random_bytes=self._random) for a in targets))
        results += [[a.host, a.port, REACHABLE if ok else UNREACHABLE] for a, ok in zip(targets, reached, strict=True)]
        await self._send(link, m.DialBackReply(msg.nonce, results, observed))
