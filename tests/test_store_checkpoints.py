"""Tests of node/store/checkpoints.py: checkpoints gathering signatures per epoch, and the
ledger snapshots kept to restart from.
"""

from __future__ import annotations

import pytest
from store_kit import (
    ALICE,
    BOB,
    C,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import Checkpoint, Store, StoreError


async def test_checkpoints_gather_signatures_and_refuse_a_second_state(store: Store) -> None:
    h = b"\x0c" * 32
    async with store.batch() as tx:
        tx.put_checkpoint(Checkpoint(C, 1, 100, 40, h, h, h, {ALICE.member.key: b"a" * 64}))
        tx.put_checkpoint(Checkpoint(C, 1, 100, 40, h, h, h, {BOB.member.key: b"b" * 64}))
    [cp] = await store.checkpoints(C)
    assert cp.signatures == {ALICE.member.key: b"a" * 64, BOB.member.key: b"b" * 64}
    with pytest.raises(StoreError, match="different checkpoint"):
        async with store.batch() as tx:
            tx.put_checkpoint(Checkpoint(C, 1, 100, 40, b"\x0d" * 32, h, h, {}))
    with pytest.raises(StoreError, match="different checkpoint"):  # another commit index
        async with store.batch() as tx:
            tx.put_checkpoint(Checkpoint(C, 1, 100, 41, h, h, h, {}))
