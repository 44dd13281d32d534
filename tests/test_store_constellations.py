"""Tests of node/store/constellations.py: the constellations this node follows, their status.
"""

from __future__ import annotations

import pytest
from store_kit import (
    OTHER_C,
    C,
    info,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import Store, StoreError


async def test_constellations_status_and_listing(store: Store) -> None:
    assert await store.constellation(C) == info()
    async with store.batch() as tx:
        tx.set_constellation_status(C, "left")
    assert (await store.constellation(C)).status == "left"  # type: ignore[union-attr]
    with pytest.raises(StoreError):
        async with store.batch() as tx:
            tx.set_constellation_status(OTHER_C, "left")
