"""The node's handler table: every peer message type goes to the one collaborator that owns
it, and a type nobody registered, like bytes that are no message, is the peer's error
(its link is penalised). In-process: one real Node on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
from nodefakes import FakeLink

from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.messaging import PENALTY_INVALID, Handlers
from valuemesh.protocol import messages as m


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    home = Home(tmp_path / "home")
    n = Node(home, home.init("table"), listen="127.0.0.1:0", api="127.0.0.1:0", network="valuemesh-test-table")
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


async def test_each_message_type_goes_to_its_owner(node: Node) -> None:
    owners: dict[type[Any], Any] = {
        m.Hello: node._on_hello, m.PeerExchange: node._on_peer_exchange,
        m.Heads: node.gossip.on_heads, m.Blocks: node.gossip.on_blocks, m.GetBlocks: node.gossip.on_get_blocks,
        m.SubmitRecords: node.gossip.on_submit_records, m.Proof: node.gossip.on_proof,
        m.JoinRequest: node.joining.on_join_request, m.JoinReply: node.joining.on_join_reply,
        m.Refuse: node.joining.on_refuse,
        m.CheckpointSig: node.catchup.on_checkpoint_sig, m.GetCheckpoint: node.catchup.on_get_checkpoint,
        m.CheckpointChain: node.catchup.on_checkpoint_chain, m.GetSnapshot: node.catchup.on_get_snapshot,
        m.SnapshotPart: node.catchup.on_snapshot_part,
        m.AddressRecords: node.addrs._on_records,
        m.DialBackAsk: node.dialback._on_ask, m.DialBackReply: node.dialback._on_reply,
        m.MySeq: node.seqcheck.on_ask, m.YourSeq: node.seqcheck.on_answer,
        m.PunchMessage: node.reach._on_punch,
    }
    assert set(owners) == set(get_args(m.Message))  # every type of the wire has an owner
    assert node.handlers.types() == set(owners)
    for cls, handler in owners.items():
        assert node.handlers.get(cls) == handler, cls.t


async def test_a_message_reaches_its_handler_through_on_message(node: Node) -> None:
    link = FakeLink()
    # Heads of a constellation we do not follow: gossip refuses it as the peer's error.
    await node.on_message(link, m.encode_message(m.Heads(bytes(32), 0, 0, [])))  # type: ignore[arg-type]
    assert link.penalties == [(PENALTY_INVALID, "The peer sent data for a constellation it does not share with us.")]


async def test_a_type_without_a_handler_and_bytes_that_are_no_message_are_refused(node: Node) -> None:
    node.handlers = Handlers()  # a table that takes nothing
    link = FakeLink()
    await node.on_message(link, m.encode_message(m.Refuse("no")))  # type: ignore[arg-type]
    assert link.penalties == [(PENALTY_INVALID, "This node does not take 'refuse' messages.")]
    await node.on_message(link, b"\xff not cbor")  # type: ignore[arg-type]
    assert len(link.penalties) == 2 and link.penalties[1][0] == PENALTY_INVALID
