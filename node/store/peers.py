"""Reads of the node's own state: peer addresses and how reachable they were, and small settings.

Written through `Batch.put_address_record`, `Batch.put_peer` / `peer_failed` / `forget_peer` and
`Batch.put_kv` / `delete_kv`.
"""

from __future__ import annotations

from valuemesh.node.store.checks import MAX_PAGE, check_limit
from valuemesh.node.store.core import StoreCore
from valuemesh.node.store.rows import PeerInfo
from valuemesh.protocol.identity import MemberId


class PeerReads(StoreCore):
    """The peers and kv tables."""

    async def peers(self, *, limit: int = MAX_PAGE) -> list[PeerInfo]:
        """Known peer addresses, most recently seen and least failing first."""
        check_limit(limit)
        rows = await self._rows(
            "SELECT member, host, port, source, last_seen, failures FROM peers "
            "ORDER BY last_seen DESC, failures, member, host, port LIMIT ?",
            (limit,),
        )
        return [PeerInfo(MemberId(bytes(m)), str(h), int(p), str(s), int(t), int(f)) for m, h, p, s, t, f in rows]

    async def address_records(self, *, limit: int = MAX_PAGE) -> list[tuple[MemberId, int, bytes]]:
        """The latest signed address record stored per member: (member, seq, raw bytes),
        most recently stored first. The caller decodes and verifies them."""
        check_limit(limit)
        rows = await self._rows(
            "SELECT member, seq, raw FROM address_records ORDER BY stored_at DESC, member LIMIT ?", (limit,)
        )
        return [(MemberId(bytes(k)), int(q), bytes(r)) for k, q, r in rows]

    async def get_kv(self, key: str) -> bytes | None:
        rows = await self._rows("SELECT value FROM kv WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None
