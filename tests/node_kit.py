"""Helpers for tests that run one real node in-process on loopback and play its peers with
bare transports (tests/test_address_*.py)."""

from __future__ import annotations

from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.transport import LinkHandler, Transport
from valuemesh.protocol.identity import Identity


async def start_node(home: Home, identity: Identity, network: str) -> Node:
    node = Node(home, identity, listen="127.0.0.1:0", api="127.0.0.1:0", network=network)
    await node.start()
    return node


async def dial_node(node: Node, identity: Identity, handler: LinkHandler) -> tuple[Transport, PeerLink]:
    """A peer with `identity` on a transport of its own, linked to `node`."""
    t = Transport(identity, node.network_id, handler)
    await t.start("127.0.0.1", 0)
    return t, await t.connect(node.listen_host, node.listen_port)
