"""Tests of node/store/checkpoints.py: checkpoints gathering signatures per epoch, and the
ledger snapshots kept to restart from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from store_kit import (
    ALICE,
    BOB,
    C,
    blk,
    info,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import Checkpoint, CommitEntry, FinalOrderError, Store, StoreError, apply
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.snapshot import Snapshot
from valuemesh.protocol.testing import TestConstellation


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


async def test_snapshots_are_kept_checked_and_served_in_parts(tmp_path: Path) -> None:
    tc = TestConstellation(2)
    tc.post(0, "contribution", {"op": "record", "action": "work", "quantity": "2", "unit": "hour"})
    snaps = [Snapshot.take(tc.ledger, epoch=e, round=10 * e, index=4 * e, clock=e, final=e) for e in (1, 2, 3)]
    async with await Store.open(tmp_path / "s.sqlite") as store:
        async with store.batch() as tx:
            tx.put_constellation(info(tc.constellation))
        assert await store.latest_snapshot(tc.constellation) is None
        for snap in snaps:
            async with store.batch() as tx:
                tx.put_snapshot(snap)
        # The latest SNAPSHOTS_KEPT are kept: epoch 1's is gone.
        assert apply.SNAPSHOTS_KEPT == 2
        assert await store.latest_snapshot(tc.constellation) == snaps[2]
        assert await store.latest_snapshot(tc.constellation, epoch=2) == snaps[1]
        assert await store.latest_snapshot(tc.constellation, epoch=1) is None
        # Parts are slices of the stored bytes, with the whole length; past the end is None.
        raw, size = snaps[2].raw, len(snaps[2].raw)
        assert await store.snapshot_part(tc.constellation, 3, 0, 7) == (raw[:7], size)
        assert await store.snapshot_part(tc.constellation, 3, 5, size) == (raw[5:], size)
        assert await store.snapshot_part(tc.constellation, 3, size, 1) is None
        assert await store.snapshot_part(tc.constellation, 1, 0, 1) is None
        with pytest.raises(LocalError):
            await store.snapshot_part(tc.constellation, 3, 0, 0)
        # The order above the latest kept snapshot (index 12) is never deleted, so a prune that
        # reaches past it is refused and changes nothing.
        with pytest.raises(FinalOrderError, match="never rewritten"):
            async with store.batch() as tx:
                ahead = [blk(ALICE, r, [], c=tc.constellation) for r in (12, 13)]
                tx.put_blocks(ahead, 1)
                tx.append_commits(tc.constellation, [CommitEntry(b.round, b.id, b.round) for b in ahead])
                tx.prune(tc.constellation, below_epoch=0, below_index=14)
        assert await store.commit_count(tc.constellation) == 12
        assert await store.block_count(tc.constellation) == 0
