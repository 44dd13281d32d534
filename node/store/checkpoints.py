"""Reads of what closes epochs: checkpoints with their gathered signatures, and the ledger
snapshots kept to restart from (whole, checked, or as slices for a peer fetching parts).
"""

from __future__ import annotations

from valuemesh.node.store.checks import MAX_PAGE_BYTES, check_position, is_uint, need
from valuemesh.node.store.codec import decode_signatures
from valuemesh.node.store.core import StoreCore
from valuemesh.node.store.errors import StoreError
from valuemesh.node.store.rows import Checkpoint
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.snapshot import Snapshot


class CheckpointReads(StoreCore):
    """The checkpoints and snapshots tables."""

    async def checkpoints(self, constellation: bytes) -> list[Checkpoint]:
        rows = await self._rows(
            "SELECT epoch, round, commit_idx, state_hash, snapshot_hash, next_committee, signatures, next_members "
            "FROM checkpoints WHERE constellation = ? ORDER BY epoch",
            (constellation,),
        )
        return [
            Checkpoint(constellation, int(e), int(r), int(i), bytes(h), bytes(sh), bytes(n),
                       decode_signatures(bytes(s)), bytes(nm))
            for e, r, i, h, sh, n, s, nm in rows
        ]

    async def latest_checkpoint(self, constellation: bytes) -> Checkpoint | None:
        cps = await self.checkpoints(constellation)
        return cps[-1] if cps else None

    async def snapshot_part(
        self, constellation: bytes, epoch: int, offset: int, size: int
    ) -> tuple[bytes, int] | None:
        """`size` bytes of an epoch's kept snapshot from `offset`, and its whole length; None if
        not kept or `offset` is past its end. Read as a slice, not decoded: a peer fetching a
        large snapshot part by part would otherwise cost a full decode per part here (the
        fetching node checks the whole against its certificate)."""
        check_position(epoch, offset)
        need(is_uint(size) and 0 < size <= MAX_PAGE_BYTES, f"A snapshot part holds 1 to {MAX_PAGE_BYTES} bytes.")
        rows = await self._rows(
            "SELECT substr(raw, ? + 1, ?), length(raw) FROM snapshots WHERE constellation = ? AND epoch = ?",
            (offset, size, constellation, epoch),
        )
        if not rows or offset >= int(rows[0][1]):
            return None
        return bytes(rows[0][0]), int(rows[0][1])

    async def latest_snapshot(self, constellation: bytes, epoch: int | None = None) -> Snapshot | None:
        """The newest kept ledger snapshot (of `epoch`, if given), checked against its stored
        hash; None if none."""
        rows = await self._rows(
            "SELECT hash, raw FROM snapshots WHERE constellation = ? AND epoch = COALESCE(?, epoch) "
            "ORDER BY epoch DESC LIMIT 1", (constellation, epoch)
        )
        if not rows:
            return None
        h, raw = bytes(rows[0][0]), bytes(rows[0][1])
        try:
            snap = Snapshot.decode(raw)
        except ValuemeshError:
            raise StoreError("A stored ledger snapshot is unreadable.") from None
        if snap.hash != h or snap.constellation != constellation:
            raise StoreError("A stored ledger snapshot does not match its hash.")
        return snap
