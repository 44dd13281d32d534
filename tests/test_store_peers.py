"""Tests of node/store/peers.py (and the peer writes of apply.py): peer addresses, failures,
the bounded table, and the small settings in kv.
"""

from __future__ import annotations

import pytest
from store_kit import (
    ALICE,
    BOB,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import PeerInfo, Store, apply


async def test_peers_and_settings(store: Store) -> None:
    async with store.batch() as tx:
        tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000, "bootstrap", 50))
        tx.put_peer(PeerInfo(BOB.member, "::1", 7001, "mdns", 40))
        tx.peer_failed(BOB.member, "::1", 7001)
        tx.peer_failed(BOB.member, "::1", 7001)
        # An older sighting never moves last_seen backwards.
        tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000, "exchange", 10))
    peers = await store.peers()
    assert [(p.member, p.last_seen, p.failures, p.source) for p in peers] == [
        (ALICE.member, 50, 0, "exchange"),
        (BOB.member, 40, 2, "mdns"),
    ]
    async with store.batch() as tx:
        tx.forget_peer(BOB.member, "::1", 7001)
        tx.put_kv("api-port", b"8080")
    assert [p.member for p in await store.peers()] == [ALICE.member]
    assert await store.get_kv("api-port") == b"8080"
    async with store.batch() as tx:
        tx.delete_kv("api-port")
    assert await store.get_kv("api-port") is None


async def test_the_peer_table_stays_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply, "MAX_PEERS", 5)
    async with store.batch() as tx:
        for i in range(8):
            tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000 + i, "exchange", 100 + i))
    assert sorted(p.port for p in await store.peers()) == [7003, 7004, 7005, 7006, 7007]
