"""Reads of the constellations this node follows: each one's genesis, status and our tier.

Written through `Batch.put_constellation` and `Batch.set_constellation_status`.
"""

from __future__ import annotations

from typing import Any, Final

from valuemesh.node.store.core import StoreCore
from valuemesh.node.store.errors import StoreError
from valuemesh.node.store.rows import ConstellationInfo
from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError

_CONSTELLATION_SELECT: Final = "SELECT id, genesis, joined_at, status, my_tier, plugins, name FROM constellations"


class ConstellationReads(StoreCore):
    """The constellations table."""

    async def constellation(self, constellation: bytes) -> ConstellationInfo | None:
        rows = await self._rows(_CONSTELLATION_SELECT + " WHERE id = ?", (constellation,))
        return _constellation_row(rows[0]) if rows else None

    async def constellations(self) -> list[ConstellationInfo]:
        rows = await self._rows(_CONSTELLATION_SELECT + " ORDER BY joined_at, id")
        return [_constellation_row(r) for r in rows]


def _constellation_row(row: Any) -> ConstellationInfo:
    cid, genesis, joined_at, status, tier, plugins, name = row
    try:
        plugin_map = cbor.decode(bytes(plugins))
    except DecodeError:
        raise StoreError("A stored constellation's plugin set is unreadable.") from None
    return ConstellationInfo(
        bytes(cid), bytes(genesis), int(joined_at), str(status), str(tier), dict(plugin_map), str(name)
    )
