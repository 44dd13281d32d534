"""The node signs its own records with consecutive seqs, reading the store only when it
does not know the next one: after a failed store it must neither skip a seq nor reuse one
that a transaction it lost track of may have stored. In-process (one real Node, loopback)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from valuemesh.node.daemon import Node
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import StoreError
from valuemesh.protocol.errors import LocalError

WORK = {"op": "record", "action": "work", "quantity": "1", "unit": "h"}


async def _with_node(tmp: Path, body: Any) -> None:
    home = Home(tmp / "home")
    ident = home.init("seq")
    node = Node(home, ident, listen="127.0.0.1:0", api="127.0.0.1:0", network="valuemesh-test-seq")
    await node.start()
    try:
        cid = node.engine_for((await node.create_constellation("seqs", ""))["id"])
        await body(node, cid)
    finally:
        await node.stop()


def test_seqs_stay_consecutive_across_a_failed_and_an_unknown_store(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(node: Node, eng: Engine) -> None:
        seqs = [(await node.submit(eng, "contribution", WORK))["seq"] for _ in range(3)]
        assert seqs == [1, 2, 3]
        real = eng.store_pending

        async def refused(records: Any, now: int) -> Any:
            raise StoreError("The store refused the batch and changed nothing: disk full.")

        monkeypatch.setattr(eng, "store_pending", refused)
        with pytest.raises(StoreError):
            await node.submit(eng, "contribution", WORK)
        monkeypatch.setattr(eng, "store_pending", real)
        assert (await node.submit(eng, "contribution", WORK))["seq"] == 4  # nothing stored: no gap

        async def stored_then_lost(records: Any, now: int) -> Any:
            await real(records, now)  # committed, but the caller never learns it
            raise LocalError("The answer was lost.")

        monkeypatch.setattr(eng, "store_pending", stored_then_lost)
        with pytest.raises(LocalError):
            await node.submit(eng, "contribution", WORK)
        monkeypatch.setattr(eng, "store_pending", real)
        # Seq 5 may be stored: the next record must not take it again.
        assert (await node.submit(eng, "contribution", WORK))["seq"] == 6
        assert (await node.submit(eng, "contribution", WORK))["seq"] == 7

    asyncio.run(_with_node(tmp_path, body))
