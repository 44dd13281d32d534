"""Builders and the `store` fixture shared by the store's tests (tests/test_store_*.py).

Import the fixture into a test module (`from store_kit import store_fixture`) and ask for `store`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from valuemesh.node.store import ConstellationInfo, Store
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Block, Record

C = bytes([7]) * 32
OTHER_C = bytes([8]) * 32
ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)


def rec(author: Identity, seq: int, body: dict[str, object] | None = None, c: bytes = C) -> Record:
    return Record.create(
        author,
        type="contribution",
        v=1,
        constellation=c,
        seq=seq,
        body=body if body is not None else {"seq": seq},
        created=1000 + seq,
    )


def blk(
    author: Identity,
    rnd: int,
    records: list[Record],
    parents: list[bytes] | None = None,
    c: bytes = C,
    epoch: int = 0,
) -> Block:
    return Block.create(
        author,
        constellation=c,
        epoch=epoch,
        round=rnd,
        prev=None,
        parents=parents or [],
        records=records,
        created=2000 + rnd,
    )


def info(c: bytes = C) -> ConstellationInfo:
    return ConstellationInfo(c, b"genesis:" + c, 5, "active", "core", {"membership": 1}, "bakery")


@pytest.fixture(name="store")
async def store_fixture(tmp_path: Path) -> AsyncIterator[Store]:
    """An open store in a fresh directory, following constellation C (`info()`)."""
    s = await Store.open(tmp_path / "node.sqlite")
    async with s.batch() as tx:
        tx.put_constellation(info())
    try:
        yield s
    finally:
        await s.close()


def count(path: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute(sql).fetchone()[0])
