"""How peer messages reach their handler and leave again: the node's table of one
handler per message type (as py-ipv8's `add_message_handler`), and the one way to send.

Collaborators (gossip, joining, catch-up, ...) register the message types they own; the
node decodes a payload, looks its type up here and calls what is registered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from valuemesh.node.engine import Engine
from valuemesh.node.link import PeerLink
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError, ValuemeshError
from valuemesh.protocol.identity import MemberId

log = logging.getLogger("valuemesh.daemon")  # the daemon's logger, as before the split: log filters keep working
PENALTY_INVALID = 20  # penalty points of a link per invalid message or block

# Sends one message to one link; a failed send is logged and dropped (the link's own
# error handling closes it), so callers never handle send errors one by one.
Send = Callable[[PeerLink, m.Message], Awaitable[None]]
Handler = Callable[[PeerLink, Any], Awaitable[None]]
# Runs a coroutine as a task the node cancels when it stops.
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
M = TypeVar("M", bound=m.Message)


async def send(link: PeerLink, msg: m.Message) -> None:
    try:
        await link.send(m.encode_message(msg))
    except (ValuemeshError, ConnectionError, TimeoutError) as exc:
        log.debug("could not send %s to %s: %s", msg.t, link.remote.short, exc)


class NotYetKnown(ValuemeshError):
    """Raised for data of a constellation we follow from a key our ledger does not count a
    member while our own join is not final here yet: the ledger is behind, not the peer
    wrong (a joiner hears from members who joined before it). Ignored, not charged."""


def engine_for_peer(engines: Mapping[bytes, Engine], link: PeerLink, cid: bytes) -> Engine:
    """The engine of `cid`, if the peer at `link` may exchange its data with us."""
    eng = engines.get(cid)
    if eng is None or not eng.may_receive(link.remote):
        if eng is not None and eng.ledger.member_status(eng.identity.member.key) != "active":
            raise NotYetKnown(f"{link.remote.short}… sent data of a constellation our ledger has not caught up "
                              "with enough to count it a member yet.")
        raise RemoteError("The peer sent data for a constellation it does not share with us.")
    return eng


def members_links(links: Mapping[MemberId, PeerLink], eng: Engine) -> list[PeerLink]:
    """The open links of this engine's members, in the order they connected."""
    return [lk for k, lk in list(links.items()) if eng.may_receive(k)]


class Handlers:
    """One handler per message type; a type nobody registered is the peer's error."""

    def __init__(self) -> None:
        self._table: dict[type[Any], Handler] = {}

    def add(self, msg_type: type[M], handler: Callable[[PeerLink, M], Awaitable[None]]) -> None:
        if msg_type in self._table:
            raise ValueError(f"Two handlers for the message type '{msg_type.t}'.")
        self._table[msg_type] = handler

    def get(self, msg_type: type[Any]) -> Handler | None:
        return self._table.get(msg_type)

    def types(self) -> frozenset[type[Any]]:
        return frozenset(self._table)

    async def dispatch(self, link: PeerLink, msg: m.Message) -> None:
        handler = self._table.get(type(msg))
        if handler is None:
            raise RemoteError(f"This node does not take '{msg.t}' messages.")
        log.debug("got %s from %s", msg.t, link.remote.short)
        await handler(link, msg)
